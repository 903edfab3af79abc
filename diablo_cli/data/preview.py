"""Which tokens of a training row the model learns (`diablo train --dry-run`), as runs of decoded text that
report/ colours."""

from __future__ import annotations

from itertools import groupby
from typing import Any

from ..records import SupervisedRun
from .tokenize import IGNORE_INDEX


def supervision_runs(tokenizer: Any, row: dict, *, seq2seq: bool = False) -> list[SupervisedRun]:
    """The decoded row in runs of supervised or masked tokens, each tagged with the packed example it is in
    (a seq2seq row: the encoder's input, masked, then the decoder's labels, supervised)."""
    if seq2seq:
        return [
            SupervisedRun(0, False, tokenizer.decode(list(row["input_ids"]), skip_special_tokens=False)),
            SupervisedRun(0, True, tokenizer.decode(list(row["labels"]), skip_special_tokens=False)),
        ]
    ids = list(row["input_ids"])
    labels = list(row["labels"])
    positions = list(row.get("position_ids") or [0] + [1] * (len(ids) - 1))
    example_of = []  # which packed example each token belongs to (a position id of 0 starts one)
    for i, position in enumerate(positions):
        example_of.append((example_of[-1] if i else 0) + (1 if i and position == 0 else 0))
    runs = groupby(range(len(ids)), key=lambda i: (example_of[i], labels[i] != IGNORE_INDEX))
    return [
        SupervisedRun(example, supervised, tokenizer.decode([ids[i] for i in indices], skip_special_tokens=False))
        for (example, supervised), indices in runs
    ]
