"""lm-evaluation-harness on the model in memory: a tiny random Llama with DiaBlo adapters and local tasks.

The tasks live in tests/data/harness; their data file path is made absolute (datasets reads a relative
one against the working directory) and the datasets cache is kept in a temporary folder.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")

import torch
import yaml
from conftest import randomize_adapters, tiny_llama
from transformers import AutoTokenizer

from diablo_cli.adapter import DiaBloConfig, adapters_disabled, attach_diablo, merge_diablo
from diablo_cli.errors import DiaBloError
from diablo_cli.evaluate.harness import clean_results, harness_available, run_harness

TASKS = Path(__file__).parent / "data" / "harness"
ROWS = sum(1 for line in (TASKS / "tiny.jsonl").read_text().splitlines() if line.strip())


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    """The tiny tasks with an absolute data path and a private datasets cache."""
    folder = tmp_path_factory.mktemp("harness-tasks")
    for source in TASKS.glob("*.yaml"):
        config = yaml.safe_load(source.read_text())
        if "dataset_kwargs" in config:
            files = config["dataset_kwargs"]["data_files"]
            files["test"] = str((TASKS / files["test"]).resolve())
            config["dataset_kwargs"]["cache_dir"] = str(folder / "datasets-cache")
        (folder / source.name).write_text(yaml.safe_dump(config))
        if config.get("task") == "diablo_tiny_choice":  # the same task on a dataset only the hub could have
            del config["dataset_kwargs"]
            config.update(task="diablo_tiny_hub", dataset_path="diablo-cli-tests/no-such-dataset")
            (folder / "diablo_tiny_hub.yaml").write_text(yaml.safe_dump(config))
    return folder


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    return AutoTokenizer.from_pretrained(smollm2_dir)


def adapted_model(tokenizer):
    """A tiny Llama whose vocabulary covers the tokenizer, with non-zero adapters on q and v."""
    model = tiny_llama(vocab_size=len(tokenizer), max_position_embeddings=256, initializer_range=0.5)
    attach_diablo(model, DiaBloConfig(blocks=2, target_modules="QV"))
    randomize_adapters(model, seed=3, scale=0.5)
    return model


@pytest.fixture(scope="module")
def adapted_score(tokenizer, task_dir):
    """The adapted model's scores on the choice task, and the model (in train mode before and after)."""
    model = adapted_model(tokenizer).train()
    pad, side, rng = tokenizer.pad_token, tokenizer.padding_side, torch.get_rng_state()
    result = run_harness(model, tokenizer, ["diablo_tiny_choice"], batch_size=4, include_path=task_dir)
    assert (tokenizer.pad_token, tokenizer.padding_side) == (pad, side)
    assert torch.equal(torch.get_rng_state(), rng)  # lm-eval reseeds torch; the caller's state comes back
    return model, result


def test_a_local_choice_task_is_scored_with_loglikelihoods(adapted_score):
    model, result = adapted_score
    assert set(result) == {"diablo_tiny_choice"}
    scores = result["diablo_tiny_choice"]
    assert scores["n"] == ROWS
    for metric in ("acc", "acc_norm", "exact_match"):
        assert 0.0 <= scores[metric] <= 1.0
        assert scores[f"{metric}_stderr"] >= 0.0
    assert 0.0 <= scores["brier_score"] <= 2.0
    assert "brier_score_stderr" not in scores  # lm-eval has none for it ("N/A"): dropped, not kept as text
    assert all(module.training for module in model.modules())  # lm-eval's model.eval() was undone


def test_adapters_are_what_is_scored_and_merging_them_changes_nothing(adapted_score, tokenizer, task_dir):
    model, adapted = adapted_score
    with adapters_disabled(model):
        bare = run_harness(model, tokenizer, ["diablo_tiny_choice"], batch_size=4, include_path=task_dir)
    assert bare["diablo_tiny_choice"]["brier_score"] != pytest.approx(adapted["diablo_tiny_choice"]["brier_score"])

    merge_diablo(model)
    merged = run_harness(model, tokenizer, ["diablo_tiny_choice"], batch_size=4, include_path=task_dir)
    for metric in ("acc", "acc_norm", "exact_match", "n"):
        assert merged["diablo_tiny_choice"][metric] == adapted["diablo_tiny_choice"][metric]
    assert merged["diablo_tiny_choice"]["brier_score"] == pytest.approx(
        adapted["diablo_tiny_choice"]["brier_score"], abs=1e-5
    )


def test_a_group_with_generation_limit_and_fewshot(tokenizer, task_dir):
    model = adapted_model(tokenizer).eval()
    result = run_harness(model, tokenizer, ["diablo_tiny"], batch_size=3, limit=3, num_fewshot=1, include_path=task_dir)
    assert set(result) == {"diablo_tiny", "diablo_tiny_choice", "diablo_tiny_gen"}
    assert result["diablo_tiny_choice"]["n"] == result["diablo_tiny_gen"]["n"] == 3
    assert result["diablo_tiny"]["n"] == 6
    gen = result["diablo_tiny_gen"]
    assert {"exact_match", "exact_match:first-word"} <= set(gen)  # the default filter is dropped, others kept
    assert 0.0 <= result["diablo_tiny"]["exact_match"] <= 1.0
    assert not model.training


def test_an_adapted_tied_output_layer_is_left_as_it_is(tokenizer, task_dir):
    """lm-eval calls model.tie_weights(), which raises on a DiaBlo-wrapped tied lm_head: it must be masked."""
    model = tiny_llama(vocab_size=len(tokenizer), max_position_embeddings=256, tie_word_embeddings=True)
    attach_diablo(model, DiaBloConfig(blocks=2, target_modules=["lm_head", "q_proj"]))
    randomize_adapters(model, seed=4, scale=0.5)
    result = run_harness(model, tokenizer, ["diablo_tiny_choice"], limit=2, include_path=task_dir)
    assert result["diablo_tiny_choice"]["n"] == 2
    assert model.lm_head.base.weight is model.model.embed_tokens.weight
    assert "tie_weights" not in vars(model)  # the mask is gone again


def test_an_unknown_task_names_close_ones(tokenizer, task_dir):
    with pytest.raises(DiaBloError, match=r"'diablo_tiny_choise' is not known.*diablo_tiny_choice"):
        run_harness(object(), tokenizer, ["diablo_tiny_choise"], include_path=task_dir)


def test_a_task_named_twice_is_refused(tokenizer, task_dir):
    with pytest.raises(DiaBloError, match=r"'diablo_tiny_choice' is asked for twice"):
        run_harness(object(), tokenizer, ["diablo_tiny", "diablo_tiny_choice"], include_path=task_dir)


def test_an_unreachable_hub_is_named_with_the_task(tokenizer, task_dir, monkeypatch):
    import datasets
    import huggingface_hub

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DiaBloError, match=r"'diablo_tiny_hub'.*Hub is unreachable.*include path") as caught:
        run_harness(object(), tokenizer, ["diablo_tiny_hub"], include_path=task_dir)
    assert "\n" not in str(caught.value)


def test_a_missing_harness_says_how_to_install_it(monkeypatch):
    for name in [name for name in sys.modules if name == "lm_eval" or name.startswith("lm_eval.")]:
        monkeypatch.setitem(sys.modules, name, None)
    assert not harness_available()
    with pytest.raises(DiaBloError, match=r"need lm-evaluation-harness: pip install 'diablo-cli\[harness\]'"):
        run_harness(object(), object(), ["arc_easy"])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"batch_size": 0}, "batch size"),
        ({"limit": 0}, "limit"),
        ({"num_fewshot": -1}, "few-shot"),
        ({"include_path": "/no/such/folder"}, "include path"),
    ],
)
def test_bad_settings_are_one_line_errors(kwargs, message):
    with pytest.raises(DiaBloError, match=message):
        run_harness(object(), object(), ["arc_easy"], **kwargs)


def test_clean_results_keeps_numbers_and_names_filters():
    output = {
        "results": {
            "gsm8k": {
                "alias": "gsm8k",
                "sample_len": 1319,
                "exact_match,strict-match": 0.25,
                "exact_match_stderr,strict-match": 0.01,
                "exact_match,none": 0.5,
                "exact_match_stderr,none": "N/A",
            },
            "group": {"alias": "group", "sample_len": 7, "acc,none": 1, "sample_count": {"acc,none": 7}},
        },
        "n-samples": {"gsm8k": {"original": 1319, "effective": 100}},
    }
    assert clean_results(output) == {
        "gsm8k": {
            "exact_match:strict-match": 0.25,
            "exact_match_stderr:strict-match": 0.01,
            "exact_match": 0.5,
            "n": 100,
        },
        "group": {"acc": 1.0, "n": 7},
    }
