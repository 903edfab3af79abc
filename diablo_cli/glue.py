"""GLUE in T5's text-to-text form: one rendering for training rows (data presets) and for scoring (eval tasks).

T5 (Raffel et al., 2020, appendix D) feeds each example as ``"<task> <field>: <text> <field>: <text>"`` and
trains the decoder to write the label's name; both sides of diablo read it from here, so that an adapter is
scored on the very prompt it was trained on.
"""

from __future__ import annotations

from typing import Any

from .errors import DiaBloError

GLUE_LABELS: dict[str, tuple[str, ...]] = {
    "cola": ("unacceptable", "acceptable"),
    "sst2": ("negative", "positive"),
    "mrpc": ("not_equivalent", "equivalent"),
    "qqp": ("not_duplicate", "duplicate"),
    "mnli": ("entailment", "neutral", "contradiction"),
    "qnli": ("entailment", "not_entailment"),
    "rte": ("entailment", "not_entailment"),
    "stsb": (),
}
GLUE_FIELDS: dict[str, tuple[str, ...]] = {
    "cola": ("sentence",),
    "sst2": ("sentence",),
    "mrpc": ("sentence1", "sentence2"),
    "qqp": ("question1", "question2"),
    "mnli": ("hypothesis", "premise"),
    "qnli": ("question", "sentence"),
    "rte": ("sentence1", "sentence2"),
    "stsb": ("sentence1", "sentence2"),
}


def glue_prompt(task: str, row: dict[str, Any]) -> str:
    """The encoder's text for one GLUE row: the task's name, then each field as ``name: text``."""
    return f"{task} " + " ".join(f"{column}: {row[column]}" for column in GLUE_FIELDS[task])


def glue_target(task: str, row: dict[str, Any]) -> str:
    """The text the model is taught to write: the label's name, or STS-B's similarity 0..5 to one decimal in
    steps of 0.2, as T5 writes it. A row without a label (GLUE's test splits hold -1) is refused."""
    label = row.get("label")
    if label is None or float(label) < 0:
        raise DiaBloError(
            f"GLUE {task} row {row.get('idx', '?')} has no label ({label!r}): GLUE's test splits are unlabelled; "
            "train on split train and score on validation"
        )
    labels = GLUE_LABELS[task]
    if not labels:
        return f"{round(float(label) * 5) / 5:.1f}"
    return labels[int(label)]
