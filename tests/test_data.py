"""The data layer: sources, formats, loss masks, truncation, packing, mixing, validation, presets, collation."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import datasets
import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_llama
from pydantic import ValidationError
from transformers import AutoTokenizer

from diablo_cli.data import (
    PRESETS,
    DataCollator,
    DataConfig,
    DatasetSource,
    generation_prompt,
    generation_prompt_ids,
    load_raw_examples,
    prepare_data,
    reference_response,
    supervision_runs,
)
from diablo_cli.data.formats import ALPACA_NO_INPUT, ALPACA_WITH_INPUT, render_example
from diablo_cli.data.presets import resolve_source
from diablo_cli.data.sources import cached_download_path
from diablo_cli.data.tokenize import encode_rendered
from diablo_cli.errors import DiaBloError
from diablo_cli.report import describe_supervision

datasets.disable_progress_bars()

IGNORE = -100
QA = [
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "The sum is 5."},
    {"instruction": "Say hello politely.", "input": "", "output": "Hello, nice to meet you!"},
    {"instruction": "Name a colour.", "input": "", "output": "Blue."},
]
PC = [
    {"prompt": "Question: what is 2+2?\nAnswer:", "completion": " 4"},
    {"prompt": "Question: capital of France?\nAnswer:", "completion": " Paris"},
]
CHAT = [
    {
        "messages": [
            {"role": "user", "content": "Hi!"},
            {"role": "assistant", "content": "Hello there."},
            {"role": "user", "content": "What is 2+2?"},
            {"role": "assistant", "content": "It is 4."},
        ]
    }
]


@pytest.fixture(scope="module")
def tok(smollm2_dir):
    """The bundled SmolLM2 tokenizer: fast, ChatML chat template, no BOS, eos <|im_end|>."""
    return AutoTokenizer.from_pretrained(smollm2_dir)


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def prepare(tmp_path, tok, records, *, seed=0, source=None, **config):
    """prepare_data on `records` written to a jsonl file, in file order unless told to shuffle."""
    path = write_jsonl(tmp_path / f"data-{len(list(tmp_path.iterdir()))}.jsonl", records)
    config.setdefault("shuffle", False)
    data_config = DataConfig(datasets=[{"path": str(path), **(source or {})}], **config)
    return prepare_data(data_config, tok, seed=seed)


def supervised_runs(tok, row) -> list[str]:
    """The decoded text of each run of supervised tokens."""
    runs, current = [], []
    for token, label in zip(row["input_ids"], row["labels"], strict=True):
        if label != IGNORE:
            current.append(token)
        elif current:
            runs.append(tok.decode(current))
            current = []
    if current:
        runs.append(tok.decode(current))
    return runs


def prompt_length(row) -> int:
    """Tokens before the first supervised one."""
    return next(i for i, label in enumerate(row["labels"]) if label != IGNORE)


# --- config -------------------------------------------------------------------------------------------------


def test_config_rejects_contradictions():
    with pytest.raises(ValidationError, match="needs `path`"):
        DatasetSource()
    with pytest.raises(ValidationError, match="validation_ratio"):
        DataConfig(datasets=[{"path": "a.jsonl"}], validation_ratio=0.1, validation_split="test")
    with pytest.raises(ValidationError, match="template"):
        DatasetSource(path="a.jsonl", format="chat", template="alpaca")
    with pytest.raises(ValidationError, match="extra"):
        DatasetSource(path="a.jsonl", colums={"a": "b"})
    with pytest.raises(ValidationError):
        DataConfig(datasets=[])


# --- masks per format ---------------------------------------------------------------------------------------


def test_instruction_alpaca_masks_the_prompt_with_and_without_input(tmp_path, tok):
    data = prepare(tmp_path, tok, QA[:2])
    with_input, without_input = data.train[0], data.train[1]
    assert supervised_runs(tok, with_input) == ["The sum is 5.<|im_end|>"]
    assert supervised_runs(tok, without_input) == ["Hello, nice to meet you!<|im_end|>"]
    expected_prompt = ALPACA_WITH_INPUT.format(instruction="Add the numbers.", input="2 and 3")
    assert tok.decode(with_input["input_ids"][: prompt_length(with_input)]) == expected_prompt
    assert "### Input:" not in tok.decode(without_input["input_ids"])
    assert tok.decode(without_input["input_ids"]).startswith(ALPACA_NO_INPUT.split("{")[0])
    assert "paired with an input" in expected_prompt


@pytest.mark.parametrize(
    ("template", "responses"),
    [
        ("alpaca", [" 4<|im_end|>", " Paris<|im_end|>"]),
        ("plain", [" 4<|im_end|>", " Paris<|im_end|>"]),
        ("chat", [" 4<|im_end|>\n", " Paris<|im_end|>\n"]),  # what ChatML adds for the assistant turn
    ],
)
def test_prompt_completion_masks_per_template(tmp_path, tok, template, responses):
    data = prepare(tmp_path, tok, PC, source={"format": "prompt_completion", "template": template})
    assert [supervised_runs(tok, row) for row in data.train] == [[r] for r in responses]
    prompt = tok.decode(data.train[0]["input_ids"][: prompt_length(data.train[0])])
    if template == "plain":
        assert prompt == PC[0]["prompt"]
    elif template == "chat":
        assert prompt.endswith("<|im_start|>user\nQuestion: what is 2+2?\nAnswer:<|im_end|>\n<|im_start|>assistant\n")
    else:
        assert prompt.endswith("### Instruction:\nQuestion: what is 2+2?\nAnswer:\n\n### Response:\n")


def test_prompt_completion_defaults_to_the_chat_template(tmp_path, tok):
    data = prepare(tmp_path, tok, PC[:1], source={"format": "prompt_completion"})
    assert tok.decode(data.train[0]["input_ids"]).startswith("<|im_start|>system")


def test_chat_supervises_every_assistant_turn(tmp_path, tok):
    data = prepare(tmp_path, tok, CHAT, source={"format": "chat"})
    row = data.train[0]
    assert supervised_runs(tok, row) == ["Hello there.<|im_end|>\n", "It is 4.<|im_end|>\n"]
    masked = tok.decode([t for t, label in zip(row["input_ids"], row["labels"], strict=True) if label == IGNORE])
    assert "Hi!" in masked and "What is 2+2?" in masked and "Hello there." not in masked


def test_text_supervises_everything_but_the_first_token(tmp_path, tok):
    data = prepare(
        tmp_path, tok, [{"body": "The quick brown fox jumps."}], source={"format": "text", "fields": {"text": "body"}}
    )
    row = data.train[0]
    assert row["labels"][0] == IGNORE
    assert row["labels"][1:] == row["input_ids"][1:]
    assert row["input_ids"][-1] == tok.eos_token_id
    assert tok.decode(row["input_ids"]) == "The quick brown fox jumps.<|im_end|>"


def test_train_on_inputs_supervises_the_prompt_too(tmp_path, tok):
    row = prepare(tmp_path, tok, QA[:1], train_on_inputs=True).train[0]
    assert row["labels"][0] == IGNORE
    assert row["labels"][1:] == row["input_ids"][1:]


def test_offsets_put_the_mask_exactly_at_a_boundary_inside_a_token(tmp_path, tok):
    """A token straddling the prompt/response boundary keeps its natural tokenisation and is supervised."""
    records = [{"prompt": "I like straw", "completion": "berries"}]
    row = prepare(tmp_path, tok, records, source={"format": "prompt_completion", "template": "plain"}).train[0]
    whole = tok("I like strawberries", add_special_tokens=False)["input_ids"]
    assert row["input_ids"] == [*whole, tok.eos_token_id]  # not "straw" + "berries" tokenised apart
    pieces = (
        tok("I like straw", add_special_tokens=False)["input_ids"]
        + tok("berries", add_special_tokens=False)["input_ids"]
    )
    assert pieces != whole  # the case where tokenising pieces separately would differ
    first = prompt_length(row)
    assert "berries" in tok.decode(row["input_ids"][first:])
    assert "berries" not in tok.decode(row["input_ids"][:first])


def test_reference_response_is_the_raw_answer():
    source = DatasetSource(path="x.jsonl")
    assert reference_response(QA[0], source) == "The sum is 5."
    assert reference_response(PC[0], DatasetSource(path="x.jsonl", format="prompt_completion")) == " 4"
    assert reference_response(CHAT[0], DatasetSource(path="x.jsonl", format="chat")) == "It is 4."


# --- generation prompts ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "records"),
    [
        ({"template": "alpaca"}, QA),
        ({"template": "plain"}, QA),
        ({"template": "chat"}, QA),
        ({"format": "prompt_completion", "template": "alpaca"}, PC),
        ({"format": "prompt_completion", "template": "plain"}, PC),
        ({"format": "prompt_completion", "template": "chat"}, PC),
    ],
)
def test_generation_prompt_is_the_masked_prefix_of_the_training_row(tmp_path, tok, source, records):
    data = prepare(tmp_path, tok, records, source=source)
    for example, row in zip(records, data.train, strict=True):
        ids = generation_prompt_ids(example, DatasetSource(path="x.jsonl", **source), tok)
        assert row["input_ids"][: len(ids)] == ids
        assert prompt_length(row) == len(ids)
        assert tok.decode(ids) == generation_prompt(example, DatasetSource(path="x.jsonl", **source), tok)


def test_chat_generation_prompt_stops_before_the_last_assistant_turn(tmp_path, tok):
    source = DatasetSource(path="x.jsonl", format="chat")
    prompt = generation_prompt(CHAT[0], source, tok)
    assert prompt.endswith("What is 2+2?<|im_end|>\n<|im_start|>assistant\n")
    assert "Hello there." in prompt and "It is 4." not in prompt
    row = prepare(tmp_path, tok, CHAT, source={"format": "chat"}).train[0]
    ids = generation_prompt_ids(CHAT[0], source, tok)
    assert row["input_ids"][: len(ids)] == ids


def test_chat_needs_a_chat_template(smollm2_dir, tmp_path):
    bare = AutoTokenizer.from_pretrained(smollm2_dir)
    bare.chat_template = None
    with pytest.raises(DiaBloError, match=r"no chat template.*valid templates: alpaca, chat, plain"):
        prepare(tmp_path, bare, PC, source={"format": "prompt_completion", "template": "chat"})
    with pytest.raises(DiaBloError, match="no chat template"):
        prepare(tmp_path, bare, CHAT, source={"format": "chat"})
    assert prepare(tmp_path, bare, PC, source={"format": "prompt_completion", "template": "plain"}).train


# --- truncation and refusals ----------------------------------------------------------------------------------


def test_truncation_and_dropping_are_counted(tmp_path, tok):
    long = {"instruction": "Repeat. " * 40, "input": "", "output": "ok"}  # prompt alone is far over 32 tokens
    medium = {"instruction": "Hi", "input": "", "output": "word " * 80}  # response cut, still supervised
    data = prepare(tmp_path, tok, [QA[2], long, medium], max_length=48, source={"template": "plain"})
    stats = data.stats
    assert stats.examples == 3
    assert stats.truncated == 2
    assert stats.dropped_no_supervision == 1
    assert stats.train_examples == 2
    assert all(len(row["input_ids"]) <= 48 for row in data.train)
    assert stats.total_tokens == sum(len(row["input_ids"]) for row in data.train)
    assert stats.supervised_tokens == sum(sum(label != IGNORE for label in row["labels"]) for row in data.train)


def test_no_supervised_token_anywhere_is_refused_with_the_reason(tmp_path, tok):
    long = {"instruction": "Repeat. " * 40, "input": "", "output": "ok"}
    with pytest.raises(DiaBloError, match=r"max_length=16.*2 of 2 were cut.*train_on_inputs"):
        prepare(tmp_path, tok, [long, long], max_length=16)
    empty = {"instruction": "Hi", "input": "", "output": ""}
    tok_no_eos = AutoTokenizer.from_pretrained(tok.name_or_path)
    tok_no_eos.eos_token = None
    tok_no_eos.pad_token = "<|endoftext|>"
    with pytest.raises(DiaBloError, match="responses of all 1 examples are empty"):
        prepare(tmp_path, tok_no_eos, [empty])


# --- packing --------------------------------------------------------------------------------------------------


def summed_loss(model, batch, **kwargs) -> torch.Tensor:
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs, **kwargs).logits
    return F.cross_entropy(
        logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=IGNORE, reduction="sum"
    )


def test_packing_gives_the_same_loss_as_no_packing(tmp_path, tok):
    records = [
        {"prompt": f"Q{i}: what is {i} plus {i}?\nA:", "completion": f" {2 * i}, since {i}+{i}={2 * i}."}
        for i in range(7)
    ]
    source = {"format": "prompt_completion", "template": "plain"}
    plain = prepare(tmp_path, tok, records, source=source, max_length=64, shuffle=True, seed=3)
    packed = prepare(tmp_path, tok, records, source=source, max_length=64, shuffle=True, seed=3, packing=True)
    assert packed.stats.packed_rows == len(packed.train) < len(plain.train) == 7
    assert any(row["position_ids"].count(0) > 1 for row in packed.train)
    collate = DataCollator(pad_token_id=tok.pad_token_id, pad_to_multiple_of=8)
    unpacked_batch = collate(list(plain.train))
    packed_batch = collate(list(packed.train))
    assert "attention_mask" not in packed_batch and "position_ids" in packed_batch

    model = tiny_llama(dtype=torch.float64, vocab_size=len(tok))
    with torch.no_grad():
        reference = summed_loss(model, unpacked_batch, use_cache=False)
        loss = summed_loss(model, packed_batch, use_cache=False)
        assert abs(loss - reference) < 1e-5

        # Without the position ids, examples attend to the ones packed before them.
        no_positions = {k: v for k, v in packed_batch.items() if k != "position_ids"}
        assert abs(summed_loss(model, no_positions, use_cache=False) - reference) > 1e-3
        # Without the boundary labels, each example's first token is predicted from the previous example.
        leaky = {**packed_batch, "labels": packed_batch["labels"].clone()}
        for i, row in enumerate(packed.train):
            for j, position in enumerate(row["position_ids"]):
                if j and position == 0:
                    leaky["labels"][i, j] = row["input_ids"][j]
        assert abs(summed_loss(model, leaky, use_cache=False) - reference) > 1e-3
        # With a cache (the config default), transformers does not look for packed sequences at all.
        assert abs(summed_loss(model, packed_batch) - reference) > 1e-3


def test_collator_pads_and_masks():
    collate = DataCollator(pad_token_id=0, pad_to_multiple_of=4)
    batch = collate([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [-100]}])
    assert batch["input_ids"].tolist() == [[5, 6, 7, 0], [8, 0, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7, -100], [-100, -100, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 0, 0, 0]]
    packed = collate([{"input_ids": [1, 2, 3], "labels": [-100, 2, 3], "position_ids": [0, 1, 0]}])
    assert packed["position_ids"].tolist() == [[0, 1, 0, 0]]  # the padding is a sequence of its own
    with pytest.raises(DiaBloError, match="mixes packed"):
        collate([{"input_ids": [1], "labels": [1]}, {"input_ids": [1], "labels": [1], "position_ids": [0]}])


# --- sources, mixing, validation ------------------------------------------------------------------------------


def test_every_local_file_type_loads_the_same_rows(tmp_path, tok):
    table = datasets.Dataset.from_list(QA)
    (tmp_path / "a.json").write_text(json.dumps(QA))
    write_jsonl(tmp_path / "a.jsonl", QA)
    table.to_csv(str(tmp_path / "a.csv"), index=False)
    table.to_parquet(str(tmp_path / "a.parquet"))
    rows = {}
    for suffix in ("json", "jsonl", "csv", "parquet"):
        source = DatasetSource(path=str(tmp_path / f"a.{suffix}"))
        assert len(load_raw_examples(source)) == 3
        config = DataConfig(datasets=[source], shuffle=False)
        rows[suffix] = prepare_data(config, tok, seed=0).train["input_ids"]
    assert rows["json"] == rows["jsonl"] == rows["csv"] == rows["parquet"]
    assert len(load_raw_examples(DatasetSource(path=str(tmp_path / "a.jsonl"), limit=2))) == 2


def test_mixing_two_datasets(tmp_path, tok):
    first = write_jsonl(tmp_path / "first.jsonl", QA)
    second = write_jsonl(tmp_path / "second.jsonl", [{"q": p["prompt"], "a": p["completion"]} for p in PC])
    config = DataConfig(
        datasets=[
            {"path": str(first)},
            {
                "path": str(second),
                "format": "prompt_completion",
                "template": "plain",
                "fields": {"prompt": "q", "completion": "a"},
            },
        ]
    )
    data = prepare_data(config, tok, seed=0)
    assert data.stats.examples == data.stats.train_examples == 5
    texts = [tok.decode(row["input_ids"]) for row in data.train]
    assert sum("### Instruction" in t for t in texts) == 3
    assert sum(t.startswith("Question:") for t in texts) == 2


def test_validation_by_ratio_holds_out_examples(tmp_path, tok):
    records = [{"instruction": f"Say {i}.", "input": "", "output": f"{i}"} for i in range(10)]
    data = prepare(tmp_path, tok, records, validation_ratio=0.2, shuffle=True)
    assert (data.stats.train_examples, data.stats.validation_examples) == (8, 2)
    train = {tuple(ids) for ids in data.train["input_ids"]}
    held = {tuple(ids) for ids in data.validation["input_ids"]}
    assert len(train | held) == 10 and not train & held


def test_validation_by_named_split_from_a_folder(tmp_path, tok):
    folder = tmp_path / "set"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", QA)
    write_jsonl(folder / "validation.jsonl", QA[:1])
    data = prepare_data(DataConfig(datasets=[{"path": str(folder)}], validation_split="validation"), tok, seed=0)
    assert (data.stats.train_examples, data.stats.validation_examples) == (3, 1)
    single = write_jsonl(tmp_path / "one.jsonl", QA)
    with pytest.raises(DiaBloError, match="only the 'train' split"):
        prepare_data(DataConfig(datasets=[{"path": str(single)}], validation_split="validation"), tok, seed=0)


def test_same_seed_same_rows_other_seed_other_order(tmp_path, tok):
    records = [{"instruction": f"Say {i}.", "input": "", "output": f"{i}"} for i in range(12)]
    path = write_jsonl(tmp_path / "d.jsonl", records)
    config = DataConfig(datasets=[{"path": str(path)}], validation_ratio=0.25, packing=True, max_length=128)
    first, again, other = (prepare_data(config, tok, seed=s) for s in (1, 1, 2))
    assert first.train.to_list() == again.train.to_list()
    assert first.validation.to_list() == again.validation.to_list()
    assert first.train.to_list() != other.train.to_list()


# --- errors ---------------------------------------------------------------------------------------------------


def test_missing_column_names_what_exists_and_the_fields_key(tmp_path, tok):
    path = write_jsonl(tmp_path / "qa.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(DiaBloError) as info:
        prepare_data(DataConfig(datasets=[{"path": str(path)}]), tok, seed=0)
    message = str(info.value)
    assert str(path) in message and "'instruction'" in message and "question, answer" in message
    assert "fields: {instruction: <column>}" in message
    with pytest.raises(DiaBloError, match=r"no column 'inp'.*fields: \{input: <column>\}"):
        load_raw_examples(
            DatasetSource(path=str(path), fields={"instruction": "question", "output": "answer", "input": "inp"})
        )
    with pytest.raises(DiaBloError, match=r"`fields` key\(s\) prompt do not apply to format 'instruction'"):
        load_raw_examples(DatasetSource(path=str(path), fields={"prompt": "question"}))


def test_missing_file_is_named(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(DiaBloError, match=r"dataset file .*nope\.jsonl.* does not exist"):
        load_raw_examples(DatasetSource(path=str(missing)))


def test_unreachable_hub_dataset_is_one_line_with_a_way_out():
    with pytest.raises(DiaBloError) as info:
        load_raw_examples(DatasetSource(path="no-such-org/no-such-dataset"))
    message = str(info.value)
    assert "\n" not in message
    assert "no-such-org/no-such-dataset" in message and "cannot be reached" in message
    assert "local file" in message and "to_json" in message
    with pytest.raises(DiaBloError, match=r"beside `preset: codealpaca`"):
        load_raw_examples(DatasetSource(preset="codealpaca"))
    with pytest.raises(DiaBloError, match="offline"):
        load_raw_examples(DatasetSource(preset="saferpaca"))  # a file URL, not on the hub


def test_unknown_preset_lists_the_valid_ones():
    with pytest.raises(DiaBloError, match=r"unknown dataset preset 'alpaca'; valid presets: commonsense-170k, "):
        load_raw_examples(DatasetSource(preset="alpaca"))


# --- presets --------------------------------------------------------------------------------------------------


def test_presets_resolve_to_their_documented_settings():
    expected = {
        "commonsense-170k": ("zwhe99/commonsense_170k", {}),
        "math10k": (
            "https://raw.githubusercontent.com/AGI-Edgerunners/LLM-Adapters/main/ft-training_set/math_10k.json",
            {},
        ),
        "metamathqa": ("meta-math/MetaMathQA", {"instruction": "query", "output": "response"}),
        "codealpaca": ("sahil2801/CodeAlpaca-20k", {}),
        "saferpaca": (
            "https://raw.githubusercontent.com/vinid/safety-tuned-llamas/main/data/training/saferpaca_Instructions_2000.json",
            {},
        ),
        "wizardlm": ("WizardLMTeam/WizardLM_evol_instruct_70k", {}),
    }
    glue = {f"glue-{task}": task for task in ("cola", "sst2", "mrpc", "qqp", "mnli", "qnli", "rte", "stsb")}
    assert set(PRESETS) == set(expected) | set(glue)
    for name, task in glue.items():  # T5's text-to-text form, rows rewritten by the preset (test_seq2seq.py)
        resolved = resolve_source(DatasetSource(preset=name))
        assert (resolved.path, resolved.name, resolved.split) == ("nyu-mll/glue", task, "train")
        assert (resolved.format, resolved.template) == ("prompt_completion", "plain")
    for name, (path, fields) in expected.items():
        resolved = resolve_source(DatasetSource(preset=name))
        assert (resolved.path, resolved.fields, resolved.format, resolved.template) == (
            path,
            fields,
            "instruction",
            "alpaca",
        )
        assert resolved.preset is None and resolved.split == "train"


def test_recipe_settings_win_over_the_preset(tmp_path, tok):
    local = write_jsonl(tmp_path / "mm.jsonl", [{"query": "What is 1+1?", "response": "2"}] * 3)
    source = DatasetSource(preset="metamathqa", path=str(local), limit=2, template="plain")
    resolved = resolve_source(source)
    assert (resolved.path, resolved.limit, resolved.template) == (str(local), 2, "plain")
    assert len(load_raw_examples(source)) == 2
    row = prepare_data(DataConfig(datasets=[source]), tok, seed=0).train[0]
    assert tok.decode(row["input_ids"]) == "What is 1+1?\n2<|im_end|>"


# --- misc -----------------------------------------------------------------------------------------------------


def test_missing_pad_token_falls_back_to_eos(smollm2_dir, tmp_path, caplog):
    bare = AutoTokenizer.from_pretrained(smollm2_dir)
    bare.pad_token = None
    with caplog.at_level(logging.INFO, logger="diablo_cli"):
        prepare(tmp_path, bare, QA[:1])
    assert bare.pad_token == bare.eos_token
    assert "no pad token" in caplog.text


def test_describe_supervision_highlights_the_response(tmp_path, tok):
    row = prepare(tmp_path, tok, QA[:1]).train[0]
    text = describe_supervision(supervision_runs(tok, row))
    assert text.plain == tok.decode(row["input_ids"])
    styled = {text.plain[span.start : span.end]: span.style for span in text.spans}
    assert styled["The sum is 5.<|im_end|>"] == "bold green"
    assert any(style == "dim" and "### Instruction" in part for part, style in styled.items())
    packed = prepare(tmp_path, tok, QA, packing=True, max_length=256).train[0]
    assert describe_supervision(supervision_runs(tok, packed)).plain.count("── next example ──") == 2


# --- tokenizer variants ---------------------------------------------------------------------------------------


class SlowTokenizer:
    """The SmolLM2 tokenizer pretending to have no offset mapping, to exercise the piecewise fallback."""

    is_fast = False

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)

    def __call__(self, *args, **kwargs):
        return self._tokenizer(*args, **kwargs)


def test_a_tokenizer_without_offsets_gives_the_same_masks_on_clean_boundaries(tok):
    for source in (DatasetSource(path="x.jsonl"), DatasetSource(path="x.jsonl", format="chat")):
        examples = QA if source.format is None else CHAT
        rendered = [render_example(example, source, tok) for example in examples]
        assert encode_rendered(SlowTokenizer(tok), rendered) == encode_rendered(tok, rendered)


def test_a_bos_adding_tokenizer_gets_exactly_one_bos(smollm2_dir, tmp_path):
    bos_tok = AutoTokenizer.from_pretrained(smollm2_dir, add_bos_token=True)
    row = prepare(tmp_path, bos_tok, QA[:1]).train[0]
    assert row["input_ids"][0] == bos_tok.bos_token_id and row["input_ids"].count(bos_tok.bos_token_id) == 1
    ids = generation_prompt_ids(QA[0], DatasetSource(path="x.jsonl"), bos_tok)
    assert (
        ids[0] == bos_tok.bos_token_id and row["input_ids"][: len(ids)] == ids == row["input_ids"][: prompt_length(row)]
    )


def test_a_template_that_rerenders_history_still_finds_every_reply(smollm2_dir, tmp_path):
    """Templates like Qwen3's render earlier turns differently once more follow; replies are then found by content."""
    odd = AutoTokenizer.from_pretrained(smollm2_dir)
    odd.chat_template = (
        "{{ messages|length }} messages\n{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</s>\n{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    row = prepare(tmp_path, odd, CHAT, source={"format": "chat"}).train[0]
    assert supervised_runs(odd, row) == ["Hello there.</s>\n", "It is 4.</s>\n"]


def test_a_cached_download_serves_a_url_preset_offline(tmp_path, monkeypatch, tok):
    monkeypatch.setenv("DIABLO_CACHE", str(tmp_path / "cache"))
    target = cached_download_path(PRESETS["saferpaca"].path)
    target.parent.mkdir(parents=True)
    target.write_text(json.dumps(QA))
    assert len(load_raw_examples(DatasetSource(preset="saferpaca"))) == 3


def test_num_proc_gives_the_same_rows(tmp_path, tok):
    records = [{"instruction": f"Say {i}.", "input": "", "output": f"{i}"} for i in range(6)]
    path = write_jsonl(tmp_path / "d.jsonl", records)
    one, two = (prepare_data(DataConfig(datasets=[{"path": str(path)}], num_proc=n), tok, seed=0) for n in (1, 2))
    assert one.train.to_list() == two.train.to_list()


def test_strings_that_look_like_dates_stay_strings(tmp_path):
    """pyarrow's JSON reader would turn "1976-08-27" into a timestamp ("1976-08-27 00:00:00")."""
    from diablo_cli.data import DatasetSource, load_raw_examples

    rows = [{"prompt": "When?", "completion": "1976-08-27"}, {"prompt": "And?", "completion": "2021-03-05"}]
    jsonl = tmp_path / "dates.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    plain_json = tmp_path / "dates.json"
    plain_json.write_text(json.dumps(rows))
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "validation.jsonl").write_text(jsonl.read_text())
    for path, split in ((jsonl, "train"), (plain_json, "train"), (folder, "validation")):
        loaded = load_raw_examples(DatasetSource(path=str(path), format="prompt_completion"), split)
        assert loaded["completion"] == ["1976-08-27", "2021-03-05"], path
    sliced = load_raw_examples(DatasetSource(path=str(jsonl), format="prompt_completion", split="train[1:]"))
    assert sliced["completion"] == ["2021-03-05"]
