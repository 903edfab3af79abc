"""One exception type for every mistake a user can make, so the CLI can print it as one line."""

import difflib


class DiaBloError(Exception):
    """Bad input: a config value, a file, a module name. The message says what is wrong and what is valid."""


class AdapterMismatchError(DiaBloError):
    """An adapter on disk does not fit the base model it is being loaded into."""


class AdapterSettingError(DiaBloError):
    """An adapter setting that does not fit the model it is attached to; the message starts with the setting's
    name, so a recipe can prefix it with its section (``adapter.blocks: ...``)."""


class TrainingStopped(DiaBloError):
    """A run stopped early on purpose (a signal) or for safety (a non-finite loss); the exit code says which."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def did_you_mean(word: str, options: list[str]) -> str:
    """``; did you mean 'q_proj'?`` for the option nearest a mistyped ``word``, or '' when none is near."""
    close = difflib.get_close_matches(word, options, n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""
