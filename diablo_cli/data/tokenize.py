"""Rendered text to token ids and labels, with the loss mask placed exactly at the prompt/response boundary.

The whole text is tokenised at once, as the model will see it, and each token is supervised when its characters
(from a fast tokenizer's offset mapping) overlap a supervised span. Tokenising prompt and response separately
would split a token that straddles the boundary and teach the model a tokenisation it never meets at inference.
"""

from __future__ import annotations

from itertools import pairwise
from typing import Any

import datasets

from .config import DatasetSource
from .formats import RenderedExample, render_example, special_prefix_ids

IGNORE_INDEX = -100

TOKENIZED_FEATURES = datasets.Features(  # Sequence, not List, so that datasets 3.x works too
    {
        "input_ids": datasets.Sequence(datasets.Value("int32")),
        "labels": datasets.Sequence(datasets.Value("int32")),
        "length": datasets.Value("int32"),  # tokens before truncation
        "truncated": datasets.Value("bool"),
        "supervised": datasets.Value("int32"),  # labels that are not IGNORE_INDEX, after truncation
    }
)


def encode_rendered(tokenizer: Any, rendered: list[RenderedExample]) -> list[tuple[list[int], list[bool]]]:
    """Token ids and, per token, whether it is supervised (response) rather than prompt."""
    if not rendered:
        return []
    prefix = special_prefix_ids(tokenizer)
    eos = tokenizer.eos_token_id
    if getattr(tokenizer, "is_fast", False):
        encoded = tokenizer(
            [r.text for r in rendered],
            add_special_tokens=False,
            return_offsets_mapping=True,
            return_attention_mask=False,
        )
        pieces = [
            (list(ids), [_overlaps(start, end, r.supervised) for start, end in offsets])
            for r, ids, offsets in zip(rendered, encoded["input_ids"], encoded["offset_mapping"], strict=True)
        ]
    else:  # no offsets: tokenise the pieces between span boundaries separately
        pieces = [_encode_by_pieces(tokenizer, r) for r in rendered]
    result = []
    for r, (ids, flags) in zip(rendered, pieces, strict=True):
        if r.special_prefix and prefix:
            ids, flags = prefix + ids, [False] * len(prefix) + flags
        if r.append_eos and eos is not None:
            ids, flags = [*ids, eos], [*flags, True]
        result.append((ids, flags))
    return result


def encode_seq2seq(tokenizer: Any, rendered: list[RenderedExample]) -> list[tuple[list[int], list[int]]]:
    """Encoder and decoder ids of each example, for encoder-decoder models (T5).

    The encoder reads the text before the last supervised span, tokenised as evaluation tokenises a generation
    prompt (`generation_prompt_ids`: the tokenizer's BOS-like prefix, no specials after); the decoder is taught
    that span, tokenised on its own as it will generate it from its start token, then eos where the format ends
    a response with one. The two sides are separate sequences, so nothing straddles their boundary.
    """
    prefix = special_prefix_ids(tokenizer)
    eos = tokenizer.eos_token_id
    pairs = []
    for r in rendered:
        start, end = r.supervised[-1] if r.supervised else (len(r.text), len(r.text))
        source = list(tokenizer(r.text[:start], add_special_tokens=False)["input_ids"])
        target = list(tokenizer(r.text[start:end], add_special_tokens=False)["input_ids"])
        if r.special_prefix:
            source = prefix + source
        if r.append_eos and eos is not None:
            target.append(eos)
        pairs.append((source, target))
    return pairs


def to_seq2seq_row(source: list[int], target: list[int], *, max_length: int) -> dict:
    """input_ids (the encoder's) and labels (the decoder's, all supervised), each cut to max_length."""
    ids, labels = source[:max_length], target[:max_length]
    return {
        "input_ids": ids,
        "labels": labels,
        "length": len(source),
        "truncated": len(source) > max_length or len(target) > max_length,
        "supervised": len(labels),
    }


def to_training_row(ids: list[int], flags: list[bool], *, max_length: int, train_on_inputs: bool) -> dict:
    """input_ids and labels cut to max_length. The first label is always ignored: nothing predicts it, and
    ignoring it keeps a packed row's first token of each example from being predicted from the previous one."""
    labels = [token if (flag or train_on_inputs) else IGNORE_INDEX for token, flag in zip(ids, flags, strict=True)]
    if labels:
        labels[0] = IGNORE_INDEX
    length = len(ids)
    ids, labels = ids[:max_length], labels[:max_length]
    return {
        "input_ids": ids,
        "labels": labels,
        "length": length,
        "truncated": length > max_length,
        "supervised": sum(label != IGNORE_INDEX for label in labels),
    }


def tokenize_examples(
    raw: datasets.Dataset,
    source: DatasetSource,
    tokenizer: Any,
    *,
    max_length: int,
    train_on_inputs: bool,
    num_proc: int | None = None,
    seq2seq: bool = False,
) -> datasets.Dataset:
    """Raw rows to training rows (cached by `datasets` under the inputs' fingerprint): one causal stream, or
    with ``seq2seq`` the encoder's input and the decoder's labels apart."""
    return raw.map(
        _tokenize_batch,
        batched=True,
        num_proc=num_proc if num_proc and num_proc > 1 and len(raw) > 1 else None,
        remove_columns=raw.column_names,
        features=TOKENIZED_FEATURES,
        fn_kwargs={
            "source": source,
            "tokenizer": tokenizer,
            "max_length": max_length,
            "train_on_inputs": train_on_inputs,
            "seq2seq": seq2seq,
        },
        desc="tokenizing",
    )


def _tokenize_batch(
    batch: dict[str, list],
    source: DatasetSource,
    tokenizer: Any,
    max_length: int,
    train_on_inputs: bool,
    seq2seq: bool,
) -> dict[str, list]:
    examples = [dict(zip(batch, values, strict=True)) for values in zip(*batch.values(), strict=True)]
    rendered = [render_example(example, source, tokenizer) for example in examples]
    if seq2seq:
        pairs = encode_seq2seq(tokenizer, rendered)
        rows = [to_seq2seq_row(ids, labels, max_length=max_length) for ids, labels in pairs]
    else:
        rows = [
            to_training_row(ids, flags, max_length=max_length, train_on_inputs=train_on_inputs)
            for ids, flags in encode_rendered(tokenizer, rendered)
        ]
    return {key: [row[key] for row in rows] for key in TOKENIZED_FEATURES}


def _overlaps(start: int, end: int, spans: tuple[tuple[int, int], ...]) -> bool:
    end = max(end, start + 1)  # a zero-width token (e.g. a prepended space marker) belongs where it sits
    return any(start < span_end and end > span_start for span_start, span_end in spans)


def _encode_by_pieces(tokenizer: Any, rendered: RenderedExample) -> tuple[list[int], list[bool]]:
    cuts = sorted({0, len(rendered.text), *(i for span in rendered.supervised for i in span)})
    ids: list[int] = []
    flags: list[bool] = []
    for start, end in pairwise(cuts):
        piece = list(tokenizer(rendered.text[start:end], add_special_tokens=False)["input_ids"])
        ids += piece
        flags += [_overlaps(start, end, rendered.supervised)] * len(piece)
    return ids, flags
