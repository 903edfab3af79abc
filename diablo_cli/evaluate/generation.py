"""Batched generation for evaluation: left-padded, greedy or seeded sampling, returning only the new text."""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

from ..errors import DiaBloError


@dataclass(frozen=True)
class Sampling:
    """How to decode: greedy (temperature 0, the default) or sampled, with ``num_samples`` per prompt.

    Sampling is seeded per batch (``seed`` + the batch's index), so a run repeats exactly for the same prompts
    and batch size.
    """

    temperature: float = 0.0
    top_p: float = 1.0
    num_samples: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.num_samples < 1:
            raise DiaBloError(
                f"sampling: temperature must be >= 0 (0 = greedy), top_p in (0, 1], num_samples >= 1; got "
                f"{self.temperature}, {self.top_p}, {self.num_samples}"
            )
        if self.temperature == 0 and self.num_samples > 1:
            raise DiaBloError(
                f"sampling: {self.num_samples} samples per prompt need a temperature above 0 (greedy decoding "
                "gives the same text every time)"
            )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


GREEDY = Sampling()


def generate(
    model,
    tokenizer,
    prompts: list[str] | list[list[int]],
    *,
    max_new_tokens: int = 32,
    batch_size: int = 16,
    stop: list[str] | None = None,
    progress: Callable[[int], None] | None = None,
    prefix_cache: bool = True,
) -> list[str]:
    """Greedy continuations of fully formatted prompts, in the order of ``prompts``.

    A prompt is text, or token ids as training saw them (``diablo_cli.data.generation_prompt_ids``):
    ids are used as they are, so the evaluated prompt is the trained one token for token.

    Prompts are batched by token length (less padding, so less wasted compute) and left-padded, so every
    row's next token sits in the last column. Each result is the newly generated text only, decoded with
    special tokens skipped and cut before the first of the ``stop`` strings. ``progress(n)`` is called
    after each batch with ``n``, the number of prompts that batch finished (an increment, so it fits
    ``rich.progress.Progress.update(task, advance=n)``). The model is put in eval mode for the call and
    the tokenizer's ``padding_side`` (and missing pad token) are restored afterwards.
    """
    samples = generate_samples(
        model,
        tokenizer,
        prompts,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        stop=stop,
        progress=progress,
        prefix_cache=prefix_cache,
    )
    return [texts[0] for texts in samples]


def generate_samples(
    model,
    tokenizer,
    prompts: list[str] | list[list[int]],
    *,
    sampling: Sampling = GREEDY,
    max_new_tokens: int = 32,
    batch_size: int = 16,
    stop: list[str] | None = None,
    progress: Callable[[int], None] | None = None,
    prefix_cache: bool = True,
) -> list[list[str]]:
    """`generate` with a decoding choice: ``sampling.num_samples`` texts per prompt (one list per prompt).

    Encoder-decoder models (T5) get the prompt as encoder input and return their whole decoder output.
    ``prefix_cache``: compute the prompts' shared opening once (see :class:`_SharedPrefix`).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if not prompts:
        return []
    stop = [s for s in (stop or []) if s]
    encoded = [list(prompt) if not isinstance(prompt, str) else _encode(tokenizer, prompt) for prompt in prompts]
    # Longest first: the biggest batch runs at once, so running out of memory shows up immediately.
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]), reverse=True)
    results: list[list[str]] = [[] for _ in prompts]
    encoder_decoder = bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))
    n = sampling.num_samples

    saved_side, saved_pad = tokenizer.padding_side, tokenizer.pad_token
    was_training = model.training
    tokenizer.padding_side = "right" if encoder_decoder else "left"
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise DiaBloError("generate: the tokenizer has neither a pad token nor an eos token to pad batches with")
        tokenizer.pad_token = tokenizer.eos_token
    try:
        model.eval()
        config = _generation_config(model, tokenizer, max_new_tokens, sampling)
        with torch.no_grad(), _contiguous_head_input(model):
            prefix = _SharedPrefix.of(model, encoded) if n == 1 and not encoder_decoder and prefix_cache else None
            for batch_index, start in enumerate(range(0, len(order), batch_size)):
                rows = order[start : start + batch_size]
                if prefix is None:
                    batch = tokenizer.pad({"input_ids": [encoded[i] for i in rows]}, return_tensors="pt")
                    batch = {key: value.to(model.device) for key, value in batch.items()}
                else:
                    batch = prefix.batch(tokenizer, [encoded[i] for i in rows])
                width = 0 if encoder_decoder else batch["input_ids"].shape[1]
                criteria = StoppingCriteriaList([_StopStrings(tokenizer, stop, width)]) if stop else None
                if not sampling.greedy:
                    torch.manual_seed(sampling.seed + batch_index)
                output = model.generate(**batch, generation_config=config, stopping_criteria=criteria)
                texts = tokenizer.batch_decode(output[:, width:], skip_special_tokens=True)
                for position, index in enumerate(rows):
                    results[index] = [cut_at_stop(text, stop) for text in texts[position * n : (position + 1) * n]]
                if progress is not None:
                    progress(len(rows))
    finally:
        tokenizer.padding_side = saved_side
        if saved_pad is None:
            tokenizer.pad_token = None
        model.train(was_training)
    return results


class _SharedPrefix:
    """The opening every prompt shares (a chat template's system turn, a few-shot block), run through the model
    once and its attention cache handed to every batch, so that only what differs is computed per prompt.

    On the quickstart's 200 chat prompts the system turn is 24 of ~53 tokens and the prompt pass is 60% of a
    greedy eval's time. Each batch is laid out as ``[prefix | left padding | rest]``: padding in the middle is
    masked like padding at the start, and positions come from the attention mask, so every row computes what it
    computes alone. Used for one sample per prompt on decoder-only models whose cache is the plain dynamic one and
    whose attention is not windowed (the cache is copied per batch); otherwise prompts are padded as before."""

    MIN_TOKENS = 16  # below this the extra pass and copies cost more than they save

    def __init__(self, ids: list[int], cache, cache_argument: str, device) -> None:
        self.ids, self.cache, self.cache_argument, self.device = ids, cache, cache_argument, device

    @classmethod
    def of(cls, model, encoded: list[list[int]]) -> _SharedPrefix | None:
        from transformers import DynamicCache

        if len(encoded) < 2 or getattr(getattr(model, "config", None), "sliding_window", None):
            return None
        shortest = min(len(ids) for ids in encoded)
        length = 0
        while length < shortest - 1 and all(ids[length] == encoded[0][length] for ids in encoded):
            length += 1  # every row keeps at least one token of its own for the cached pass to continue from
        if length < cls.MIN_TOKENS:
            return None
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # a PEFT model's own forward
        parameters = inspect.signature(inner.forward).parameters  # takes **kwargs: ask the transformers model's
        argument = "cache" if "cache" in parameters else "past_key_values"
        if argument not in parameters:
            return None
        ids = torch.tensor([encoded[0][:length]], device=model.device)
        head = {"logits_to_keep": 1} if "logits_to_keep" in parameters else {}  # the prefix's logits go unused
        outputs = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True, **head)
        cache = outputs.get("cache", None) if "cache" in outputs else outputs.get("past_key_values", None)
        if type(cache) is not DynamicCache or cache.get_seq_length() != length:
            return None
        return cls(encoded[0][:length], cache, argument, model.device)

    def batch(self, tokenizer, rows: list[list[int]]) -> dict:
        """``generate``'s inputs for ``rows``: the prefix, each row's rest left-padded after it, the cache copied."""
        rest = tokenizer.pad({"input_ids": [ids[len(self.ids) :] for ids in rows]}, return_tensors="pt")
        prefix = torch.tensor([self.ids]).expand(len(rows), -1)
        cache = copy.deepcopy(self.cache)
        cache.batch_repeat_interleave(len(rows))
        return {
            "input_ids": torch.cat([prefix, rest["input_ids"]], dim=1).to(self.device),
            "attention_mask": torch.cat([torch.ones_like(prefix), rest["attention_mask"]], dim=1).to(self.device),
            self.cache_argument: cache,
        }


@contextmanager
def _contiguous_head_input(model) -> Iterator[None]:
    """Hand the output head a contiguous input while generating.

    The prefill computes logits for the last position only, on a strided view ``hidden[:, -1:, :]``. Where the
    head's weight is frozen (every adapter freezes it), torch's matmul cannot fold that view into one matrix
    product and broadcasts the weight into a batched one instead: a copy of the whole head per row. On SmolLM2 at
    eval batch 16 that is an 864 MiB temporary, the quickstart's whole-process peak; the
    contiguous copy of the input is 18 KiB.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, nn.Module):
        yield
        return
    handle = head.register_forward_pre_hook(_contiguous_first_argument)
    try:
        yield
    finally:
        handle.remove()


def _contiguous_first_argument(module: nn.Module, args: tuple) -> tuple | None:
    if args and isinstance(args[0], torch.Tensor) and not args[0].is_contiguous():
        return (args[0].contiguous(), *args[1:])
    return None


def cut_at_stop(text: str, stop: list[str] | None) -> str:
    """``text`` up to (not including) the earliest occurrence of any stop string."""
    positions = [text.find(s) for s in stop or [] if s and s in text]
    return text[: min(positions)] if positions else text


def _encode(tokenizer, prompt: str) -> list[int]:
    """Token ids of a formatted prompt, adding the tokenizer's special tokens only when the text lacks them.

    Chat templates such as Llama 3's already begin with the BOS token; adding it again would give the
    model two. SmolLM2's ChatML template has no BOS and its tokenizer adds none, so either way is the same.
    """
    bos = tokenizer.bos_token
    already_has_bos = bool(bos) and prompt.startswith(bos)
    return tokenizer(prompt, add_special_tokens=not already_has_bos)["input_ids"]


def _generation_config(model, tokenizer, max_new_tokens: int, sampling: Sampling) -> GenerationConfig:
    """The model's own generation config (its EOS ids) with exactly the decoding asked for, nothing inherited
    (a checkpoint's default temperature or top-k would otherwise change what "greedy" means)."""
    base = getattr(model, "generation_config", None)
    config = copy.deepcopy(base) if base is not None else GenerationConfig()
    config.num_beams = 1
    config.do_sample = not sampling.greedy
    config.temperature = None if sampling.greedy else sampling.temperature
    config.top_p = None if sampling.greedy or sampling.top_p == 1 else sampling.top_p
    config.top_k = None
    config.num_return_sequences = sampling.num_samples
    config.max_new_tokens = max_new_tokens
    config.max_length = None
    config.pad_token_id = tokenizer.pad_token_id
    if config.eos_token_id is None:
        config.eos_token_id = tokenizer.eos_token_id
    return config


class _StopStrings(StoppingCriteria):
    """Finishes each row once its new text contains a stop string, so no step is spent past the answer."""

    def __init__(self, tokenizer, stop: list[str], prompt_width: int) -> None:
        self.tokenizer, self.stop, self.prompt_width = tokenizer, stop, prompt_width

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_width :], skip_special_tokens=True)
        done = [any(s in text for s in self.stop) for text in texts]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)
