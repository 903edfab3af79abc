"""Evaluation: batched greedy generation equals one-at-a-time generation, exact match, and the quickstart data."""

from __future__ import annotations

import datetime as dt
import importlib.util
import json
import math
import re
from pathlib import Path

import pytest
import torch
from conftest import tiny_llama
from transformers import AutoModelForCausalLM, AutoTokenizer

from diablo_cli.evaluate import Sampling, exact_match, generate, generate_samples, normalize_answer
from diablo_cli.evaluate.generation import cut_at_stop

ROOT = Path(__file__).parents[1]
QUICKSTART = ROOT / "diablo_cli" / "resources" / "quickstart"
# Deliberately of very different lengths and not sorted, so batches need padding and get reordered.
QUESTIONS = [
    "Convert this date to YYYY-MM-DD: March 5th, 2021",
    "hi",
    "Write the date the twenty-third of November 1999 in ISO format (YYYY-MM-DD), please, and nothing else.",
    "What is 2047-2-1 as YYYY-MM-DD?",
    "Normalize to YYYY-MM-DD: 5/3/21 (day first)",
]


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    return AutoTokenizer.from_pretrained(smollm2_dir)


def chat_prompt(tokenizer, question: str) -> str:
    """One user message in the model's chat template, ending where the assistant's answer starts."""
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False
    )


@pytest.fixture(scope="module")
def prompts(tokenizer) -> list[str]:
    return [chat_prompt(tokenizer, q) for q in QUESTIONS]


@pytest.fixture(scope="module")
def model(tokenizer):
    # A wide initialisation makes the random model's logits far apart, so float noise cannot flip a greedy choice.
    return tiny_llama(vocab_size=len(tokenizer), initializer_range=0.5)


def alone(model, tokenizer, prompts: list[str], **kwargs) -> list[str]:
    return [generate(model, tokenizer, [p], batch_size=1, **kwargs)[0] for p in prompts]


def test_batched_left_padded_equals_one_at_a_time(model, tokenizer, prompts):
    expected = alone(model, tokenizer, prompts, max_new_tokens=8)
    assert any(expected)
    for batch_size in (2, len(prompts)):
        assert generate(model, tokenizer, prompts, max_new_tokens=8, batch_size=batch_size) == expected


def test_order_preserved_and_progress_counts_each_batch(model, tokenizer, prompts):
    expected = alone(model, tokenizer, prompts, max_new_tokens=6)
    reordered = prompts[::-1] + prompts[:2]
    calls: list[int] = []
    out = generate(model, tokenizer, reordered, max_new_tokens=6, batch_size=3, progress=calls.append)
    assert out == expected[::-1] + expected[:2]
    assert calls == [3, 3, 1]
    assert len(calls) == math.ceil(len(reordered) / 3)


def test_greedy_matches_model_generate_on_one_prompt(model, tokenizer, prompts):
    """Only the new tokens come back, decoded with special tokens skipped."""
    ids = tokenizer(prompts[0], add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
    reference = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    assert generate(model, tokenizer, prompts[:1], max_new_tokens=8) == [reference]


def test_stop_strings_cut_the_text(model, tokenizer, prompts):
    full = generate(model, tokenizer, prompts, max_new_tokens=12)
    text = max(full, key=len)
    stop = text[len(text) // 2 :][:2]
    assert stop
    stopped = generate(model, tokenizer, prompts, max_new_tokens=12, stop=[stop, "never-appears"])
    assert stopped == [cut_at_stop(t, [stop]) for t in full]
    assert stop not in "".join(stopped)


def test_restores_padding_side_pad_token_and_training_mode(model, tokenizer, prompts):
    tokenizer.padding_side = "right"
    saved_pad = tokenizer.pad_token
    model.train()
    try:
        generate(model, tokenizer, prompts[:2], max_new_tokens=2)
        assert tokenizer.padding_side == "right"
        assert tokenizer.pad_token == saved_pad
        assert model.training
    finally:
        model.eval()


def test_frozen_head_gets_a_contiguous_input(tokenizer, prompts):
    """HF slices the prefill's last position as a strided view; with a frozen head torch's matmul would then
    copy the whole head once per row (864 MiB at the quickstart's eval batch). generate hands it a copy."""
    model = tiny_llama(vocab_size=len(tokenizer), initializer_range=0.5).requires_grad_(False)
    head = model.get_output_embeddings()
    seen: list[bool] = []
    head.register_forward_hook(lambda module, args, output: seen.append(args[0].is_contiguous()))
    batch = tokenizer(prompts[:3], return_tensors="pt", padding=True)
    with torch.no_grad():
        model.generate(**batch, max_new_tokens=1, do_sample=False)
    assert seen == [False]  # the premise: transformers itself hands the head a strided view
    seen.clear()
    hooks = dict(head._forward_pre_hooks)
    generate(model, tokenizer, prompts, max_new_tokens=3, batch_size=len(prompts), prefix_cache=False)
    assert len(seen) == 3 and all(seen)
    assert dict(head._forward_pre_hooks) == hooks  # nothing left on the model


def test_the_shared_prefix_is_computed_once_and_changes_no_text(model, tokenizer, prompts):
    """The chat template's system turn (24 tokens on SmolLM2) runs once per call, not once per prompt; every text
    equals the plainly padded path's and the one-prompt-at-a-time one's."""
    shared = 0
    encoded = [tokenizer(p)["input_ids"] for p in prompts]
    while all(ids[shared] == encoded[0][shared] for ids in encoded):
        shared += 1
    assert shared >= 16
    plain = generate(model, tokenizer, prompts, max_new_tokens=8, batch_size=len(prompts), prefix_cache=False)
    assert plain == alone(model, tokenizer, prompts, max_new_tokens=8)
    for batch_size in (2, 3, len(prompts)):
        shapes, handle = embedding_calls(model)
        try:
            assert generate(model, tokenizer, prompts, max_new_tokens=8, batch_size=batch_size) == plain
        finally:
            handle.remove()
        assert shapes[0] == (1, shared)  # the prefix, once
        longest = max(map(len, encoded))
        first_passes = [shape for shape in shapes[1:] if shape[1] > 1]
        assert len(first_passes) == math.ceil(len(prompts) / batch_size)
        assert all(shape[1] <= longest - shared for shape in first_passes)  # each batch: only what differs


def test_a_peft_model_shares_the_prefix_too(tokenizer, prompts):
    """PEFT's forward takes **kwargs: the cache argument is read from the model it wraps (the race's LoRA eval)."""
    from peft import LoraConfig, get_peft_model

    lora = get_peft_model(
        tiny_llama(vocab_size=len(tokenizer), initializer_range=0.5),
        LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    )
    plain = generate(lora, tokenizer, prompts, max_new_tokens=6, batch_size=len(prompts), prefix_cache=False)
    shapes, handle = embedding_calls(lora.get_base_model())
    try:
        assert generate(lora, tokenizer, prompts, max_new_tokens=6, batch_size=len(prompts)) == plain
    finally:
        handle.remove()
    assert shapes[0][0] == 1 and shapes[0][1] >= 16


@pytest.mark.parametrize("case", ["short prefix", "one prompt", "samples"])
def test_no_prefix_pass_where_it_cannot_pay(model, tokenizer, prompts, case):
    """Bare questions share no 16-token opening; one prompt has nothing to share; sampled copies are not cached."""
    texts = {"short prefix": QUESTIONS, "one prompt": prompts[:1], "samples": prompts}[case]
    sampling = Sampling(temperature=1.0, num_samples=2) if case == "samples" else Sampling()
    shapes, handle = embedding_calls(model)
    try:
        generate_samples(model, tokenizer, texts, sampling=sampling, max_new_tokens=2, batch_size=len(texts))
    finally:
        handle.remove()
    assert shapes[0][1] == max(len(tokenizer(text)["input_ids"]) for text in texts)  # whole prompts, padded


def embedding_calls(model) -> tuple[list[tuple[int, ...]], object]:
    shapes: list[tuple[int, ...]] = []
    embeddings = model.get_input_embeddings()
    handle = embeddings.register_forward_hook(lambda module, args, output: shapes.append(tuple(args[0].shape)))
    return shapes, handle


def test_empty_and_bad_batch_size(model, tokenizer):
    assert generate(model, tokenizer, []) == []
    with pytest.raises(ValueError, match="batch_size"):
        generate(model, tokenizer, ["x"], batch_size=0)


def test_cut_at_stop_takes_the_earliest_stop():
    assert cut_at_stop("2021-03-05\nThat is all.", ["\n"]) == "2021-03-05"
    assert cut_at_stop("a.b\nc", ["\n", "."]) == "a"
    assert cut_at_stop("abc", ["x"]) == "abc"
    assert cut_at_stop("abc", None) == "abc"
    assert cut_at_stop("abc", [""]) == "abc"


@pytest.mark.parametrize(
    ("raw", "normal"),
    [
        ("  2021-03-05 \n", "2021-03-05"),
        ("2021-03-05.", "2021-03-05"),
        ('"2021-03-05"', "2021-03-05"),
        ("'2021-03-05'.", "2021-03-05"),
        ('"2021-03-05."', "2021-03-05"),
        ("`42`", "42"),
        ("“yes”", "yes"),
        ("Wait...", "Wait..."),  # an ellipsis is content, not a full stop
        ('"unbalanced', '"unbalanced'),
        ("Mixed Case", "Mixed Case"),
        ("a  b", "a  b"),
        ("", ""),
    ],
)
def test_normalize_answer(raw, normal):
    assert normalize_answer(raw) == normal


def test_exact_match():
    predictions = ["2021-03-05.", " 1999-11-23\n", "2021-3-5", '"2021-03-05"']
    assert exact_match(predictions, ["2021-03-05", "1999-11-23", "2021-03-05", "2021-03-05"]) == 0.75
    assert exact_match(["ABC"], ["abc"]) == 0.0
    assert exact_match([], []) == 0.0
    with pytest.raises(ValueError, match="2 predictions for 1 references"):
        exact_match(["a", "b"], ["a"])


def load_generator():
    spec = importlib.util.spec_from_file_location("make_quickstart_data", ROOT / "scripts" / "make_quickstart_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_generator_is_deterministic_and_matches_the_shipped_files(tmp_path):
    generator = load_generator()
    for run in ("a", "b"):
        generator.main(["--out", str(tmp_path / run)])
    for name in ("train.jsonl", "test.jsonl", "README.md"):
        first = (tmp_path / "a" / name).read_bytes()
        assert first == (tmp_path / "b" / name).read_bytes(), name
        assert first == (QUICKSTART / name).read_bytes(), f"{name} is stale: run scripts/make_quickstart_data.py"


def test_shipped_data_is_well_formed_and_disjoint():
    train, test = read_jsonl(QUICKSTART / "train.jsonl"), read_jsonl(QUICKSTART / "test.jsonl")
    assert len(test) >= 100 and len(train) >= 500
    for example in train + test:
        assert set(example) == {"prompt", "completion"}
        assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", example["completion"])
        dt.date.fromisoformat(example["completion"])  # a real calendar date
        assert "YYYY-MM-DD" in example["prompt"]
    train_dates = {e["completion"] for e in train}
    assert len(train_dates) == len(train)
    assert not train_dates & {e["completion"] for e in test}
    assert not {e["prompt"] for e in train} & {e["prompt"] for e in test}
    load_generator().check_disjoint(train, test)


def test_date_styles_render_known_dates():
    generator = load_generator()
    assert [generator.suffix(d) for d in (1, 2, 3, 4, 11, 12, 13, 21, 22, 23, 31)] == [
        "st", "nd", "rd", "th", "th", "th", "th", "st", "nd", "rd", "st",
    ]  # fmt: skip
    assert [generator.ordinal_word(d) for d in (1, 12, 20, 23, 30, 31)] == [
        "first", "twelfth", "twentieth", "twenty-third", "thirtieth", "thirty-first",
    ]  # fmt: skip
    rendered = {name: render(dt.date(2021, 3, 5)) for name, (render, _) in generator.STYLES.items()}
    assert rendered["the ordinal of month yyyy"] == "the fifth of March 2021"
    assert rendered["weekday, month d, yyyy"] == "Friday, March 5, 2021"
    assert rendered["d/m/yy (day first)"] == "5/3/21 (day first)"
    assert rendered["mon d 'yy"] == "Mar 5 '21"
    assert len(set(rendered.values())) == len(rendered)


@pytest.mark.slow
def test_base_smollm2_fails_the_quickstart_task(smollm2_dir, tokenizer):
    """The task must stay one the base model fails, or the quickstart shows nothing."""
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    examples = read_jsonl(QUICKSTART / "test.jsonl")[:30]
    prompts = [chat_prompt(tokenizer, e["prompt"]) for e in examples]
    predictions = generate(model, tokenizer, prompts, max_new_tokens=16)
    assert exact_match(predictions, [e["completion"] for e in examples]) <= 0.2


def test_token_id_prompts_generate_like_their_text(model, tokenizer, prompts):
    """Training's own prompt ids (data.generation_prompt_ids) can be given instead of text."""
    ids = [tokenizer(p)["input_ids"] for p in prompts]
    assert generate(model, tokenizer, ids, max_new_tokens=6) == generate(model, tokenizer, prompts, max_new_tokens=6)
