"""Benchmarks we do not implement ourselves, run by EleutherAI's lm-evaluation-harness on the model in memory.

The model is handed over as it is (a base with DiaBlo adapters attached, or merged), so what is scored is
exactly what ``diablo eval`` would score, with no save-and-reload round trip. lm-evaluation-harness is an
optional extra; it is imported only when a harness task is asked for.

Results come back as ``{task: {metric: value, "n": examples}}``. lm-eval keys each metric by its filter
(``"acc,none"``); the default filter ``none`` is dropped (``"acc"``) and any other is kept after a colon
(``"exact_match:strict-match"``). Standard errors are kept as ``"<metric>_stderr"`` (same filter suffix)
where lm-eval computed one: analytically for averaged metrics, from ``BOOTSTRAP_ITERS`` serial bootstrap
resamples for corpus metrics (BLEU, F1, ...); metrics without one (e.g. ``brier_score``) have none.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import functools
import logging
import os
import random
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..errors import DiaBloError

INSTALL_HINT = "pip install 'diablo-cli[harness]'"
BOOTSTRAP_ITERS = 100
"""lm-eval's own default (100000, in a process pool forked from this one) is far too slow next to a model."""
FEWSHOT_SEED_OFFSET = 1234
"""lm-eval seeds Python with 0 and numpy, torch and the few-shot sampler with 1234: seed 0 reproduces it."""
VERBOSE_ENV = "LMEVAL_LOG_LEVEL"
"""lm-eval's own switch for its log level: when set, lm-eval logs at that level with its own handler."""

# Notices lm-eval logs for every pre-loaded model, or for what the caller asked for: noise for our users.
_EXPECTED_NOTICES = (
    "`pretrained` model kwarg is not of type `str`",
    "Passed an already-initialized model through `pretrained`",
    "Overwriting default num_fewshot",
)
_NOTICE_LOGGERS = ("lm_eval.models.huggingface", "lm_eval.evaluator")
_GLOB_CHARACTERS = "*?["


def harness_available() -> bool:
    """Whether lm-evaluation-harness can be imported (the ``harness`` extra is installed)."""
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        return False
    return True


def run_harness(
    model,
    tokenizer,
    tasks: list[str],
    *,
    batch_size: int = 8,
    limit: int | None = None,
    num_fewshot: int | None = None,
    include_path: str | Path | None = None,
    seed: int = 0,
    verbose: bool = False,
) -> dict[str, dict[str, float]]:
    """Score ``model`` on lm-eval ``tasks`` (names, groups, tags, globs, or paths of task YAML files).

    ``limit`` caps the examples per task (for quick looks: a capped score is not the benchmark's score);
    ``num_fewshot`` overrides the tasks' own few-shot counts; ``include_path`` is a folder of extra task
    YAML files, for local data or offline use. ``seed`` seeds Python, numpy, torch and the few-shot sampler
    (numpy, torch and the sampler with ``seed + 1234``, so 0 gives lm-eval's own defaults). lm-eval's logs
    are kept to warnings unless ``verbose`` or ``$LMEVAL_LOG_LEVEL`` asks for more; its prints go to stderr.

    The model's train/eval flags, the global random states and the tokenizer are left as they were:
    lm-eval switches the model to eval mode, reseeds every generator and may give the tokenizer a pad token.
    """
    _check_counts(batch_size, limit, num_fewshot)
    harness = _import_harness()
    include = _check_include_path(include_path)
    with _harness_output(verbose):
        manager = _task_manager(include)
        names = _task_names(manager, tasks, include)
        selected = [obj for name in names for obj in _load_task(manager, name)]
        _check_supported(selected)
        with _model_state_kept(model), _random_state_kept(), _tokenizer_for_harness(tokenizer) as harness_tokenizer:
            lm = _wrap_model(harness, model, harness_tokenizer, batch_size)
            output = harness["simple_evaluate"](
                model=lm,
                tasks=selected,
                task_manager=manager,
                limit=limit,
                num_fewshot=num_fewshot,
                log_samples=False,
                bootstrap_iters=BOOTSTRAP_ITERS,
                random_seed=seed,
                numpy_random_seed=seed + FEWSHOT_SEED_OFFSET,
                torch_random_seed=seed + FEWSHOT_SEED_OFFSET,
                fewshot_random_seed=seed + FEWSHOT_SEED_OFFSET,
            )
    if output is None:  # only a non-zero rank of a distributed run gets None; we never start one
        raise DiaBloError("lm-evaluation-harness returned no results (is this a non-zero rank of a distributed run?)")
    return clean_results(output)


def clean_results(output: dict[str, Any]) -> dict[str, dict[str, float]]:
    """lm-eval's result dict as ``{task: {metric: value, "n": examples}}``: numbers only, filter ``none`` dropped.

    ``n`` is the number of examples scored (after ``limit``) for a task, and their sum for a group.
    """
    counts = output.get("n-samples") or {}
    cleaned: dict[str, dict[str, float]] = {}
    for task, entry in (output.get("results") or {}).items():
        row: dict[str, float] = {}
        for key, value in entry.items():
            metric, comma, filter_name = key.partition(",")
            if not comma or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue  # name, alias, sample_len, sample_count, and stderrs that are "N/A"
            row[metric if filter_name == "none" else f"{metric}:{filter_name}"] = float(value)
        n = (counts.get(task) or {}).get("effective", entry.get("sample_len"))
        if isinstance(n, int) and not isinstance(n, bool):
            row["n"] = n
        cleaned[task] = row
    return cleaned


# --- checks and lookups ------------------------------------------------------------------------------------


def _check_counts(batch_size: int, limit: int | None, num_fewshot: int | None) -> None:
    if not _whole(batch_size, 1):
        raise DiaBloError(f"harness batch size: {batch_size!r} must be a whole number of at least 1")
    if limit is not None and not _whole(limit, 1):
        raise DiaBloError(f"harness limit: {limit!r} must be a whole number of examples per task, at least 1")
    if num_fewshot is not None and not _whole(num_fewshot, 0):
        raise DiaBloError(f"harness few-shot count: {num_fewshot!r} must be a whole number, 0 or more")


def _whole(value: Any, least: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def _import_harness() -> dict[str, Any]:
    """lm-eval's entry points, or one line on how to install it (naming a broken dependency if that is why)."""
    try:
        from lm_eval.evaluator import simple_evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as err:
        missing = getattr(err, "name", None) or ""
        why = "" if missing.split(".")[0] in ("", "lm_eval") else f" (its dependency {missing!r} failed to import)"
        raise DiaBloError(f"harness tasks need lm-evaluation-harness{why}: {INSTALL_HINT}") from err
    return {"simple_evaluate": simple_evaluate, "HFLM": HFLM, "TaskManager": TaskManager}


def _check_include_path(include_path: str | Path | None) -> str | None:
    if include_path is None:
        return None
    path = Path(include_path).expanduser()
    if not path.is_dir():
        raise DiaBloError(
            f"harness include path {str(path)!r} is not a folder; give the folder that holds your task YAML files "
            "(a single task YAML file can be named as a task instead)"
        )
    return str(path.resolve())


@functools.lru_cache(maxsize=4)
def _task_manager(include: str | None):
    """lm-eval's index of every task YAML (built-ins and ``include``): seconds to build, so built once per
    process (a YAML added to ``include`` after the first run in a process is not seen)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include)


def _task_names(manager, tasks: list[str] | str, include: str | None) -> list[str]:
    """The requested names, comma lists split and globs expanded, each checked against lm-eval's index."""
    requested = [tasks] if isinstance(tasks, str) else list(tasks)
    names: list[str] = []
    for name in (part.strip() for item in requested for part in str(item).split(",")):
        if not name:
            continue
        if name in manager.all_tasks or (name.endswith((".yaml", ".yml")) and Path(name).expanduser().is_file()):
            found = [name]
        elif any(c in name for c in _GLOB_CHARACTERS) and manager.match_tasks([name]):
            found = manager.match_tasks([name])
        else:
            raise DiaBloError(_unknown_task_message(manager, name, include))
        names += [found_name for found_name in found if found_name not in names]
    if not names:
        raise DiaBloError("no harness tasks given; name lm-eval tasks, e.g. arc_easy,hellaswag (see: lm-eval ls tasks)")
    return names


def _unknown_task_message(manager, name: str, include: str | None) -> str:
    close = difflib.get_close_matches(name, manager.all_tasks, n=5, cutoff=0.6)
    hint = f"close names: {', '.join(close)}" if close else "list the valid names with: lm-eval ls tasks"
    if include is None:
        where = "; a local task needs the folder of its YAML as include path"
    else:  # lm-eval skips a YAML it cannot parse without a word, so a broken file looks like a missing task
        where = f"; a YAML under {include} that does not parse is skipped silently"
    return f"harness task {name!r} is not known to lm-evaluation-harness ({hint}){where}"


def _load_task(manager, name: str) -> list[Any]:
    """Build one task or group (this reads its dataset), turning a failure into one line that names it.

    Returns the top-level Task/Group objects, which ``simple_evaluate`` takes as they are: the datasets
    are not read a second time.
    """
    try:
        loaded = manager.load([name])
    except Exception as err:
        reason = _first_line(err)
        if _hub_unreachable(err):
            raise DiaBloError(
                f"harness task {name!r}: its dataset could not be downloaded, the Hugging Face Hub is unreachable "
                f"({reason}); run it once online to cache the dataset, or point the task at local files in a "
                "task YAML under an include path"
            ) from err
        raise DiaBloError(f"harness task {name!r} could not be loaded: {type(err).__name__}: {reason}") from err
    children = {child for members in (loaded.get("group_map") or {}).values() for child in members}
    groups = [group for key, group in (loaded.get("groups") or {}).items() if key not in children]
    return groups + [task for key, task in loaded["tasks"].items() if key not in children]


def _hub_unreachable(err: BaseException) -> bool:
    """datasets raises ConnectionError offline; the causes below it vary between versions, so walk them all."""
    offline_types = {"ConnectionError", "OfflineModeIsEnabled", "LocalEntryNotFoundError", "ConnectError"}
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, ConnectionError) or type(current).__name__ in offline_types:
            return True
        current = current.__cause__ or current.__context__
    return False


def _first_line(err: BaseException) -> str:
    text = str(err).strip().strip("\"'")
    return text.splitlines()[0] if text else type(err).__name__


def _check_supported(selected: list[Any]) -> None:
    """Refuse up front what lm-eval would refuse only after building every request."""
    from lm_eval.api.group import Group

    owner: dict[str, str] = {}
    for obj in selected:
        source, members = (obj.name, obj.get_all_tasks()) if isinstance(obj, Group) else (obj.task_name, [obj])
        for task in members:
            name = task.task_name
            if owner.setdefault(name, source) != source:
                raise DiaBloError(
                    f"harness task {name!r} is asked for twice (in {owner[name]!r} and {source!r}); name it once"
                )
            if getattr(task, "UNSAFE_CODE", False):
                raise DiaBloError(f"harness task {name!r} executes model-written code, which diablo does not run")
            if getattr(task, "MULTIMODAL", False):
                raise DiaBloError(f"harness task {name!r} needs images; diablo evaluates text-only language models")


# --- handing the model over ---------------------------------------------------------------------------------


def _wrap_model(harness: dict[str, Any], model, tokenizer, batch_size: int):
    """lm-eval's HFLM around the model object itself: no reload, so adapters are scored as they are.

    HFLM takes the model's own device (its ``device`` argument only applies to models it loads itself) and
    calls ``model.tie_weights()``, which raises on a tied output layer wrapped by DiaBlo and could re-tie
    weights a merge untied on purpose; so ``tie_weights`` is masked while HFLM is built.
    """
    model.tie_weights = _no_tie  # an instance attribute: shadows the method until deleted
    try:
        return harness["HFLM"](pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    finally:
        del model.tie_weights


def _no_tie(*args, **kwargs) -> None:
    """The model's ties are already what they should be; re-tying could undo a merge's deliberate untie."""


@contextlib.contextmanager
def _tokenizer_for_harness(tokenizer) -> Iterator[Any]:
    """A copy of the tokenizer with a pad token, so lm-eval changes nothing of the caller's.

    Without a pad token HFLM would set one on the tokenizer, and with neither unk nor eos it would add a
    new token that the model's embeddings do not cover; eos pads here, as in our own generation. A
    tokenizer that does not deep-copy is used itself, and its pad token and padding side are put back.
    """
    try:
        harness_tokenizer = copy.deepcopy(tokenizer)
    except Exception:
        harness_tokenizer = tokenizer
    saved = harness_tokenizer.pad_token, harness_tokenizer.padding_side
    if harness_tokenizer.pad_token is None and harness_tokenizer.eos_token is not None:
        harness_tokenizer.pad_token = harness_tokenizer.eos_token
    try:
        yield harness_tokenizer
    finally:
        if harness_tokenizer is tokenizer:
            tokenizer.pad_token, tokenizer.padding_side = saved


@contextlib.contextmanager
def _model_state_kept(model) -> Iterator[None]:
    """Every module's train/eval flag as it was, whatever happened (lm-eval calls ``model.eval()``)."""
    flags = [(module, module.training) for module in model.modules()]
    try:
        yield
    finally:
        for module, training in flags:
            module.training = training


@contextlib.contextmanager
def _random_state_kept() -> Iterator[None]:
    """lm-eval reseeds Python, numpy and torch globally; a run in the middle of training must not notice."""
    import numpy as np
    import torch

    python_state, numpy_state, torch_state = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)
        torch.set_rng_state(torch_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)


# --- lm-eval's output ---------------------------------------------------------------------------------------


class _DropExpectedNotices(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_EXPECTED_NOTICES)


@contextlib.contextmanager
def _harness_output(verbose: bool) -> Iterator[None]:
    """lm-eval's logs down to real warnings, its ``print`` calls onto stderr (stdout may carry our JSON), and
    bootstrap resampling in this process rather than a pool forked from a process holding a model."""
    saved_multiproc = os.environ.get("DISABLE_MULTIPROC")
    os.environ["DISABLE_MULTIPROC"] = "1"
    lm_eval_logger = logging.getLogger("lm_eval")
    saved_level = lm_eval_logger.level
    notice_filter = _DropExpectedNotices()
    quiet = not verbose and not os.environ.get(VERBOSE_ENV)
    if quiet:
        lm_eval_logger.setLevel(logging.WARNING)
        for name in _NOTICE_LOGGERS:
            logging.getLogger(name).addFilter(notice_filter)
    else:
        from lm_eval.utils import setup_logging

        setup_logging("INFO")  # lm-eval's own handler and format; $LMEVAL_LOG_LEVEL overrides the level
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        if saved_multiproc is None:
            os.environ.pop("DISABLE_MULTIPROC", None)
        else:
            os.environ["DISABLE_MULTIPROC"] = saved_multiproc
        if quiet:
            lm_eval_logger.setLevel(saved_level)
            for name in _NOTICE_LOGGERS:
                logging.getLogger(name).removeFilter(notice_filter)
