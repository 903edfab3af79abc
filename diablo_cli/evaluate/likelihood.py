"""Log-likelihood scoring: which of the given continuations does the model find most probable?

The alternative to reading an answer out of a generation (lm-evaluation-harness scores multiple choice this
way): no decoding, no extraction, and the result does not depend on the model's phrasing. Reported as
``acc`` (highest summed log-probability) and ``acc_norm`` (highest log-probability per character, which does
not favour short continuations).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..loss import IGNORE_INDEX, sequence_logprobs


def continuation_logprobs(
    model,
    tokenizer,
    prompt_ids: list[list[int]],
    continuations: list[list[str]],
    *,
    batch_size: int = 16,
    progress: Callable[[int], None] | None = None,
) -> list[list[float]]:
    """Summed log-probabilities of each continuation after its prompt: one list per prompt, one value per choice.

    A continuation is tokenised on its own (no special tokens) and appended to the prompt's ids, so the prompt
    is exactly the generation prompt. Decoder-only models score all (prompt, choice) pairs in right-padded
    batches (through loss.sequence_logprobs: only the choice's positions reach the output layer, never a
    batch's full logits); encoder-decoder models take the prompt as encoder input and the choice as decoder
    labels.
    """
    pairs = [(p, c) for p, choices in enumerate(continuations) for c in range(len(choices))]
    scores: list[list[float]] = [[0.0] * len(choices) for choices in continuations]
    choice_ids = [[tokenizer(text, add_special_tokens=False)["input_ids"] for text in cs] for cs in continuations]
    encoder_decoder = bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    was_training = model.training
    model.eval()
    done_prompts = 0
    try:
        with torch.no_grad():
            for start in range(0, len(pairs), batch_size):
                chunk = pairs[start : start + batch_size]
                prompts = [prompt_ids[p] for p, _ in chunk]
                targets = [choice_ids[p][c] for p, c in chunk]
                if encoder_decoder:
                    values = _seq2seq_scores(model, prompts, targets, pad)
                else:
                    values = _causal_scores(model, prompts, targets, pad)
                for (p, c), value in zip(chunk, values, strict=True):
                    scores[p][c] = value
                finished = sum(1 for p, c in chunk if c == len(continuations[p]) - 1)
                done_prompts += finished
                if progress is not None and finished:
                    progress(finished)
    finally:
        model.train(was_training)
    return scores


def _causal_scores(model, prompts: list[list[int]], targets: list[list[int]], pad: int) -> list[float]:
    sequences = [p + t for p, t in zip(prompts, targets, strict=True)]
    width = max(map(len, sequences))
    ids = torch.full((len(sequences), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, IGNORE_INDEX)  # only the continuation's tokens are scored
    for row, (prompt, target) in enumerate(zip(prompts, targets, strict=True)):
        ids[row, : len(prompt) + len(target)] = torch.tensor(prompt + target)
        mask[row, : len(prompt) + len(target)] = 1
        labels[row, len(prompt) : len(prompt) + len(target)] = torch.tensor(target)
    device = model.device
    return sequence_logprobs(model, ids.to(device), mask.to(device), labels.to(device)).tolist()


def _seq2seq_scores(model, prompts: list[list[int]], targets: list[list[int]], pad: int) -> list[float]:
    def padded(rows: list[list[int]], value: int) -> torch.Tensor:
        out = torch.full((len(rows), max(map(len, rows))), value, dtype=torch.long)
        for i, row in enumerate(rows):
            out[i, : len(row)] = torch.tensor(row)
        return out

    inputs = padded(prompts, pad)
    labels = padded(targets, -100)
    device = model.device
    logits = model(
        input_ids=inputs.to(device), attention_mask=(inputs != pad).long().to(device), labels=labels.to(device)
    ).logits.float()
    logprobs = torch.log_softmax(logits, dim=-1)
    values = []
    for row, target in enumerate(targets):
        chosen = torch.tensor(target, device=device)
        values.append(float(logprobs[row, torch.arange(len(target), device=device), chosen].sum()))
    return values


def best_choice(scores: list[float], choices: list[str], *, per_character: bool = False) -> int:
    """Index of the most probable choice (by total, or per character of the choice's text)."""
    if per_character:
        normalised = [s / max(1, len(c)) for s, c in zip(scores, choices, strict=True)]
        return max(range(len(choices)), key=normalised.__getitem__)
    return max(range(len(choices)), key=scores.__getitem__)
