"""Rows to a padded batch of tensors."""

from __future__ import annotations

import torch

from ..errors import DiaBloError
from .tokenize import IGNORE_INDEX


class DataCollator:
    """Right-pads rows into tensors: input_ids with the pad id, labels with -100.

    Unpacked rows get an attention_mask. Packed rows (with position_ids) get none: transformers then derives the
    per-example causal mask from the position ids, which it does only when attention_mask is None and no cache is
    used, so call the model with ``use_cache=False`` when training. The padding of a packed row gets positions
    0, 1, … of its own, so it is a separate sequence that no example attends to.

    With ``decoder_start_token_id`` (an encoder-decoder base) rows are seq2seq rows: input_ids and labels are
    padded apart, and decoder_input_ids are the labels shifted right behind the start token, as the model's own
    ``_shift_right`` makes them; the decoder's causal mask keeps its right padding out of every real position.
    """

    def __init__(
        self, pad_token_id: int, pad_to_multiple_of: int | None = None, *, decoder_start_token_id: int | None = None
    ):
        if pad_to_multiple_of is not None and pad_to_multiple_of < 1:
            raise DiaBloError(f"pad_to_multiple_of must be at least 1, not {pad_to_multiple_of}")
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of
        self.decoder_start_token_id = decoder_start_token_id

    @property
    def seq2seq(self) -> bool:
        return self.decoder_start_token_id is not None

    def supervised_tokens(self, batch: dict[str, torch.Tensor]) -> int:
        """Tokens the loss is taken on: a causal model predicts label i from position i - 1, so the first label
        never counts; an encoder-decoder's logits line up with its labels."""
        labels = batch["labels"] if self.seq2seq else batch["labels"][..., 1:]
        return int((labels != IGNORE_INDEX).sum())

    def tokens(self, batch: dict[str, torch.Tensor]) -> int:
        """Tokens the model reads in ``batch`` (an encoder-decoder's decoder tokens too): for throughput."""
        read = int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()
        return read + (int((batch["labels"] != IGNORE_INDEX).sum()) if self.seq2seq else 0)

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        if not rows:
            raise DiaBloError("cannot collate an empty batch")
        if self.seq2seq:
            return self._seq2seq_batch(rows)
        packed = "position_ids" in rows[0]
        if any(("position_ids" in row) != packed for row in rows):
            raise DiaBloError("a batch mixes packed rows (with position_ids) and unpacked rows")
        width = max(len(row["input_ids"]) for row in rows)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        extra = torch.zeros((len(rows), width), dtype=torch.long)  # position_ids or attention_mask
        for i, row in enumerate(rows):
            n = len(row["input_ids"])
            input_ids[i, :n] = torch.as_tensor(row["input_ids"], dtype=torch.long)
            labels[i, :n] = torch.as_tensor(row["labels"], dtype=torch.long)
            if packed:
                extra[i, :n] = torch.as_tensor(row["position_ids"], dtype=torch.long)
                extra[i, n:] = torch.arange(width - n)
            else:
                extra[i, :n] = 1
        batch = {"input_ids": input_ids, "labels": labels}
        batch["position_ids" if packed else "attention_mask"] = extra
        return batch

    def _seq2seq_batch(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        input_ids, attention_mask = self._padded([row["input_ids"] for row in rows], self.pad_token_id)
        labels, _ = self._padded([row["labels"] for row in rows], IGNORE_INDEX)
        decoder_input_ids = torch.full_like(labels, self.pad_token_id)
        decoder_input_ids[:, 0] = self.decoder_start_token_id
        decoder_input_ids[:, 1:] = labels[:, :-1].masked_fill(labels[:, :-1] == IGNORE_INDEX, self.pad_token_id)
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "decoder_input_ids": decoder_input_ids,
        }

    def _padded(self, sequences: list[list[int]], fill: int) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(1, *map(len, sequences))
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        values = torch.full((len(sequences), width), fill, dtype=torch.long)
        mask = torch.zeros((len(sequences), width), dtype=torch.long)
        for i, sequence in enumerate(sequences):
            values[i, : len(sequence)] = torch.as_tensor(sequence, dtype=torch.long)
            mask[i, : len(sequence)] = 1
        return values, mask
