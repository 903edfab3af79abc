"""The whole data pipeline: recipe `data:` section in, training and validation rows out, with their numbers."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import datasets

from ..errors import DiaBloError
from .config import DataConfig, DatasetSource
from .formats import format_of
from .packing import pack_dataset
from .presets import resolve_source
from .sources import load_raw_examples, source_label
from .tokenize import tokenize_examples

log = logging.getLogger("diablo_cli")

ROW_COLUMNS = ("input_ids", "labels")


@dataclass
class DataStats:
    examples: int  # examples loaded (training and validation, before any was dropped)
    train_examples: int  # training examples kept
    validation_examples: int  # validation examples kept
    truncated: int  # examples cut to max_length (training and validation)
    dropped_no_supervision: int  # examples left with no supervised token (training and validation)
    supervised_tokens: int  # in the training rows
    total_tokens: int  # in the training rows
    packed_rows: int | None  # training rows after packing; None without packing


@dataclass
class PreparedData:
    train: datasets.Dataset
    validation: datasets.Dataset | None
    stats: DataStats


def prepare_data(config: DataConfig, tokenizer: Any, *, seed: int, seq2seq: bool = False) -> PreparedData:
    """Load, format, tokenise, mix, split and (optionally) pack. The same inputs and seed give the same rows.

    Rows hold `input_ids` and `labels` (same length), plus `position_ids` when packed; with ``seq2seq`` (an
    encoder-decoder base) `input_ids` is the encoder's prompt and `labels` the decoder's response. Batch them
    with `DataCollator`.
    """
    ensure_pad_token(tokenizer)
    if seq2seq:
        _refuse_for_seq2seq(config)
    train_parts = [_tokenized(source, None, config, tokenizer, seq2seq) for source in config.datasets]
    train = datasets.concatenate_datasets(train_parts) if len(train_parts) > 1 else train_parts[0]
    if config.shuffle:
        train = train.shuffle(seed=seed)
    validation: datasets.Dataset | None = None
    if config.validation_split:
        parts = [_tokenized(source, config.validation_split, config, tokenizer, seq2seq) for source in config.datasets]
        validation = datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    elif config.validation_ratio > 0:
        train, validation = _hold_out(train, config.validation_ratio, seed=seed, shuffle=config.shuffle)

    examples = len(train) + (len(validation) if validation is not None else 0)
    truncated = sum(train["truncated"]) + (sum(validation["truncated"]) if validation is not None else 0)
    _refuse_without_supervision(train, config)
    train, dropped = _drop_unsupervised(train)
    if validation is not None:
        validation, dropped_validation = _drop_unsupervised(validation)
        dropped += dropped_validation
        if len(validation) == 0:
            log.warning("no validation example has a supervised token within max_length; validation is skipped")
    supervised_tokens = sum(train["supervised"])
    if seq2seq:  # the encoder's tokens and the decoder's, every one of which is supervised
        total_tokens = sum(map(len, train["input_ids"])) + supervised_tokens
    else:
        total_tokens = sum(min(n, config.max_length) for n in train["length"])
    stats = DataStats(
        examples=examples,
        train_examples=len(train),
        validation_examples=len(validation) if validation is not None else 0,
        truncated=truncated,
        dropped_no_supervision=dropped,
        supervised_tokens=supervised_tokens,
        total_tokens=total_tokens,
        packed_rows=None,
    )
    train = train.select_columns(list(ROW_COLUMNS))
    if validation is not None:
        validation = validation.select_columns(list(ROW_COLUMNS)) if len(validation) else None
    if config.packing:
        train = pack_dataset(train, config.max_length)
        validation = pack_dataset(validation, config.max_length) if validation is not None else None
        stats.packed_rows = len(train)
    return PreparedData(train=train, validation=validation, stats=stats)


def ensure_pad_token(tokenizer: Any) -> None:
    """Padding needs a pad token; without one, use eos (padding is never attended to or learned)."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise DiaBloError("the tokenizer has neither a pad token nor an eos token to pad with")
        tokenizer.pad_token = tokenizer.eos_token
        log.info("the tokenizer has no pad token; padding with its eos token %r", tokenizer.eos_token)


def _tokenized(
    source: DatasetSource, split: str | None, config: DataConfig, tokenizer: Any, seq2seq: bool
) -> datasets.Dataset:
    raw = load_raw_examples(source, split)
    return tokenize_examples(
        raw,
        resolve_source(source),
        tokenizer,
        max_length=config.max_length,
        train_on_inputs=config.train_on_inputs,
        num_proc=config.num_proc,
        seq2seq=seq2seq,
    )


def _refuse_for_seq2seq(config: DataConfig) -> None:
    """What the sequence-to-sequence layout cannot honour, refused in one line each."""
    if config.packing:
        raise DiaBloError(
            "data.packing: an encoder-decoder model cannot be packed (its encoder attends both ways, so packed "
            "examples would read each other, and each needs its own decoder); set packing: false"
        )
    if config.train_on_inputs:
        raise DiaBloError(
            "data.train_on_inputs: an encoder-decoder model learns only the decoder's response (the prompt is its "
            "encoder's input, never predicted); set train_on_inputs: false"
        )
    for source in config.datasets:
        if format_of(source) == "text":
            raise DiaBloError(
                f"dataset {source_label(source)}: format text has no prompt for an encoder-decoder model's encoder; "
                "use instruction, prompt_completion or chat"
            )


def _hold_out(
    rows: datasets.Dataset, ratio: float, *, seed: int, shuffle: bool
) -> tuple[datasets.Dataset, datasets.Dataset]:
    held = max(1, round(len(rows) * ratio))
    if held >= len(rows):
        raise DiaBloError(
            f"validation_ratio {ratio} of {len(rows)} examples leaves no training example; lower it or add data"
        )
    split = rows.train_test_split(test_size=held, shuffle=shuffle, seed=seed)
    return split["train"], split["test"]


def _drop_unsupervised(rows: datasets.Dataset) -> tuple[datasets.Dataset, int]:
    kept = rows.filter(lambda supervised: [n > 0 for n in supervised], input_columns="supervised", batched=True)
    return kept, len(rows) - len(kept)


def _refuse_without_supervision(train: datasets.Dataset, config: DataConfig) -> None:
    """If no training example has a token to learn, say why instead of training on nothing."""
    if len(train) == 0:
        raise DiaBloError("the datasets hold no training example (check `limit`, `split` and the files)")
    if any(n > 0 for n in train["supervised"]):
        return
    truncated = sum(train["truncated"])
    longest = max(train["length"])
    if truncated:
        raise DiaBloError(
            f"no training example has a supervised token within max_length={config.max_length}: {truncated} of "
            f"{len(train)} were cut before their response starts (the longest has {longest} tokens); raise "
            f"`max_length`, shorten the prompts, or set `train_on_inputs: true`"
        )
    raise DiaBloError(
        f"no training example has a supervised token: the responses of all {len(train)} examples are empty; check "
        f"the output/completion column (`fields:`) or set `train_on_inputs: true`"
    )
