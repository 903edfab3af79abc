"""Training DiaBlo adapters on quantized bases: bitsandbytes 4/8-bit and GPTQ (GPTQModel) layers.

The adapters' gradients on a quantized model are compared with those on the same model whose quantized layers
were replaced by their dequantized dense twins: a quantized layer that stops passing gradients to its input
(the no-grad traps in diablo_cli/quantize/trainable.py) makes every adapter before it wrong, so these
comparisons run after an eval-mode forward pass without gradients, the pass that sets the traps off.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
from conftest import randomize_adapters, requires, tiny_llama
from rich.console import Console

from diablo_cli import DiaBloConfig, DiaBloError, adapted_layers, attach_diablo
from diablo_cli.models import load_base_model
from diablo_cli.precision import choose_dtype
from diablo_cli.quantize import dequantize_weight, dequantized_layers, replace_layers
from diablo_cli.quantize.trainable import prepare_quantized_training, quantized_layers
from diablo_cli.recipe import QuantizationSection, load_recipe, validate_recipe
from diablo_cli.tracking import read_metrics

TINY = Path(__file__).parents[1] / "configs" / "tiny.yaml"
TOKENS = torch.randint(0, 2000, (2, 24), generator=torch.Generator().manual_seed(3))


def load(base: Path | str, dtype: str | None = "fp32", **quantization):
    model, _ = load_base_model(str(base), dtype=dtype, quantization=QuantizationSection(**quantization))
    return model


def adapt(model, *, prepare: bool = True):
    if prepare:
        prepare_quantized_training(model)
    attach_diablo(model, DiaBloConfig(blocks=8, target_modules="QKVOGUD"))
    randomize_adapters(model)  # non-zero blocks: gradients also flow back through the adapter branches
    return model


def adapter_gradients(model) -> dict[str, torch.Tensor]:
    model.train()
    model.zero_grad(set_to_none=True)
    model(input_ids=TOKENS, labels=TOKENS).loss.backward()
    return {name: layer.diablo_blocks.grad.detach().clone() for name, layer in adapted_layers(model).items()}


def run_without_gradients(model) -> None:
    """What an evaluation before training (or a validation pass) does: the traps' trigger."""
    model.eval()
    with torch.no_grad():
        model(input_ids=TOKENS)


def gradient_errors(model, *, check=None) -> dict[str, float]:
    """Each adapter's gradient after a no-grad eval forward, against the gradient with every quantized layer
    swapped for its dequantized dense twin: relative error by layer. ``check(model)`` runs before the swap."""
    dense = dequantized_layers(model, model.dtype)  # before the model first runs
    run_without_gradients(model)
    if check is not None:
        check(model)
    quantized = adapter_gradients(model)
    for layer in adapted_layers(model).values():  # the dense twins must not fold the blocks into a bf16 weight:
        layer.kernel = "blocks"  # compare with the math the quantized layers do (a separate fp32 product)
    replace_layers(model, dense)
    reference = adapter_gradients(model)
    assert quantized.keys() == reference.keys() and len(quantized) == 21
    return {name: ((quantized[name] - reference[name]).norm() / reference[name].norm()).item() for name in quantized}


def first_layer(errors: dict[str, float]) -> list[float]:
    return [error for name, error in errors.items() if name.startswith("model.layers.0.")]


def refuses_to_train(pattern: str):
    def check(model) -> None:
        with pytest.raises(DiaBloError, match=pattern):
            prepare_quantized_training(model)

    return check


# -- gradients: GPTQ ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [4, 2])
def test_gptq_adapter_gradients_match_the_dequantized_model(request, bits):
    model = adapt(load(request.getfixturevalue(f"gptq_{bits}bit_dir"), method="gptq"))
    assert {type(layer).__name__ for layer in quantized_layers(model).values()} == {"TorchLinear"}
    # The same math (the kernel dequantizes, then multiplies); measured: identical to the last bit.
    assert max(gradient_errors(model).values()) < 1e-5


def test_gptq_in_the_auto_dtype(gptq_4bit_dir):
    model = adapt(load(gptq_4bit_dir, dtype=None, method="gptq"))
    assert model.dtype == choose_dtype("auto").torch_dtype  # bf16 where native, else fp32 (the torch kernel runs both)
    assert max(gradient_errors(model).values()) < 1e-3  # measured: identical here too


def test_the_auto_gptq_kernel_cuts_gradients_after_a_no_grad_forward(gptq_4bit_dir):
    """The trap, shown: loaded as transformers does by default, the CPU kernel repacks itself for a no-grad int4
    op on its first eval-mode forward without gradients; every adapter before such a layer then gets a wrong
    gradient (the residual stream still carries some). prepare_quantized_training refuses such a model, and
    pins a fresh one to its training path."""
    from transformers import AutoModelForCausalLM

    trapped = adapt(AutoModelForCausalLM.from_pretrained(gptq_4bit_dir, dtype=torch.float32), prepare=False)
    assert {type(layer).__name__ for layer in quantized_layers(trapped).values()} == {"TorchAtenLinear"}
    errors = gradient_errors(trapped, check=refuses_to_train("switched to its inference path"))
    assert min(first_layer(errors)) > 0.1  # measured: 0.7-0.95 (only the very last layer's stay right)

    pinned = AutoModelForCausalLM.from_pretrained(gptq_4bit_dir, dtype=torch.float32)
    assert "kernel TorchAtenLinear (pinned to its training path)" in prepare_quantized_training(pinned).describe()
    assert max(gradient_errors(adapt(pinned)).values()) < 1e-5


# -- gradients: bitsandbytes -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("settings", "tolerance"),
    [
        ({"method": "bnb-4bit"}, 1e-4),  # NF4, double quant, computing in the model's fp32: measured exact
        ({"method": "bnb-4bit", "quant_type": "fp4", "double_quant": False}, 1e-4),
        ({"method": "bnb-4bit", "compute_dtype": "bf16"}, 0.03),  # bf16 matmuls against the fp32 twin: ~0.008
        ({"method": "bnb-8bit"}, 1e-4),  # training mode runs LLM.int8 as dequantize + fp matmul on CPU
    ],
    ids=["nf4", "fp4", "nf4-bf16-compute", "8bit"],
)
def test_bnb_adapter_gradients_match_the_dequantized_model(quantizable_llama_dir, settings, tolerance):
    requires("bitsandbytes")
    model = adapt(load(quantizable_llama_dir, **settings))
    assert max(gradient_errors(model).values()) < tolerance


def test_bnb_4bit_cpu_repacking_cuts_gradients_unless_prepared(quantizable_llama_dir):
    requires("bitsandbytes")
    trapped = adapt(load(quantizable_llama_dir, method="bnb-4bit"), prepare=False)
    if not next(iter(quantized_layers(trapped).values())).support_avx512bf16_for_cpu:
        pytest.skip("bitsandbytes repacks 4-bit weights for its CPU kernel only on CPUs with AVX512-BF16")
    errors = gradient_errors(trapped, check=refuses_to_train("repacked this 4-bit weight"))
    assert min(first_layer(errors)) > 0.1  # measured: 0.25-0.97


# -- diablo train --------------------------------------------------------------------------------------------------


def train_on(tmp_path: Path, base: str, *overrides: str):
    """`diablo train` on the tiny recipe (validation every 2 steps: no-grad eval passes between training steps),
    keeping hold of the trained model."""
    import diablo_cli.train as train_module

    recipe = load_recipe(
        TINY,
        [
            f"base_model={base}",
            f"output.dir={tmp_path / 'run'}",
            "logging.progress=false",
            "training.max_steps=6",
            "training.eval_steps=2",
            "training.save_steps=100",
            "data.datasets.0.limit=40",
            *overrides,
        ],
    )
    console = Console(file=io.StringIO(), width=200)
    result = train_module.train(recipe, console=console)
    return result, console.file.getvalue(), result.model


@pytest.mark.parametrize(
    ("base", "quantization", "described"),
    [
        ("gptq_4bit_dir", {"method": "gptq"}, "GPTQ 4-bit, group 32, kernel TorchLinear (trainable)"),
        ("gptq_2bit_dir", {"method": "gptq", "bits": 2}, "GPTQ 2-bit, group 32, kernel TorchLinear (trainable)"),
        # tiny-random-llama's intermediate size 176 is no multiple of 32: bitsandbytes' CPU kernel would fail
        ("tiny-random-llama", {"method": "bnb-4bit"}, "bitsandbytes 4-bit nf4, kernel Linear4bit"),
        ("tiny-random-llama", {"method": "bnb-8bit"}, "bitsandbytes 8-bit, kernel Linear8bitLt"),
    ],
    ids=["gptq-4bit", "gptq-2bit", "bnb-4bit", "bnb-8bit"],
)
def test_training_on_a_quantized_base(request, tmp_path, base, quantization, described):
    requires("gptqmodel", "optimum") if base.startswith("gptq") else requires("bitsandbytes")
    if base.startswith("gptq"):
        base = str(request.getfixturevalue(base))
    fresh = load(base, dtype="fp32", **quantization)  # as configs/tiny.yaml trains it
    before = {name: dequantize_weight(layer) for name, layer in quantized_layers(fresh).items()}

    settings = [f"model.quantization.{key}={value}" for key, value in quantization.items()]
    result, output, model = train_on(tmp_path, base, *settings)

    assert f"base: {described}" in output and "21 quantized layers" in output
    losses = [m["loss"] for m in read_metrics(result.output_dir / "metrics.jsonl") if "loss" in m]
    assert len(losses) == 6 and losses[-1] < losses[0]
    layers = {name.removesuffix(".base"): layer for name, layer in quantized_layers(model).items()}
    assert layers.keys() == before.keys() and len(layers) == 21
    for name, layer in layers.items():  # packed weights: no gradient, not a bit changed
        assert all(parameter.grad is None and not parameter.requires_grad for parameter in layer.parameters())
        assert torch.equal(dequantize_weight(layer), before[name]), name
    assert all(layer.diablo_blocks.abs().sum() > 0 for layer in adapted_layers(model).values())
    # The model as training left it (after its no-grad validation passes) still passes every gradient on.
    assert max(gradient_errors(model).values()) < 1e-3
    recorded = json.loads((result.output_dir / "adapter_config.json").read_text())["base_model"]["quantization"]
    bits = {"gptq": quantization.get("bits", 4), "bnb-4bit": 4, "bnb-8bit": 8}[quantization["method"]]
    assert recorded["method"] == quantization["method"] and recorded["bits"] == bits


# -- loading and its errors ----------------------------------------------------------------------------------------


def test_a_gptq_checkpoint_loads_as_gptq_with_method_none(gptq_4bit_dir):
    """``none`` loads a checkpoint as it was saved; a GPTQ one still gets the kernel that trains."""
    model = load(gptq_4bit_dir, dtype=None)
    assert {type(layer).__name__ for layer in quantized_layers(model).values()} == {"TorchLinear"}
    assert prepare_quantized_training(model).describe().startswith("GPTQ 4-bit, group 32, kernel TorchLinear")


def test_gptq_on_a_full_precision_base_is_refused(quantizable_llama_dir):
    with pytest.raises(DiaBloError, match=r"gptq: .* is not a GPTQ checkpoint .* diablo quantize"):
        load(quantizable_llama_dir, method="gptq")


def test_a_method_that_contradicts_the_checkpoint_is_refused(gptq_4bit_dir):
    requires("gptqmodel", "optimum")
    with pytest.raises(DiaBloError, match=r"bnb-4bit: .* already quantized \(GPTQ 4-bit, group 32\); set method gptq"):
        load(gptq_4bit_dir, method="bnb-4bit")
    with pytest.raises(DiaBloError, match=r"model.quantization.bits 8: .* is a 4-bit GPTQ checkpoint"):
        load(gptq_4bit_dir, method="gptq", bits=8)


def test_a_saved_bitsandbytes_checkpoint_loads_with_its_own_settings(quantizable_llama_dir, tmp_path):
    requires("bitsandbytes")
    from transformers import AutoTokenizer

    load(quantizable_llama_dir, method="bnb-4bit", quant_type="fp4").save_pretrained(tmp_path / "fp4")
    AutoTokenizer.from_pretrained(quantizable_llama_dir).save_pretrained(tmp_path / "fp4")
    model = load(tmp_path / "fp4", dtype=None)
    assert prepare_quantized_training(model).describe().startswith("bitsandbytes 4-bit fp4, kernel Linear4bit")
    with pytest.raises(DiaBloError, match=r"quant_type: .* already quantized .* loads with its own settings"):
        load(tmp_path / "fp4", method="bnb-4bit", quant_type="nf4")


@pytest.mark.parametrize(
    ("method", "extra", "missing"), [("bnb-4bit", "bnb", "bitsandbytes"), ("gptq", "gptq", "optimum")]
)
def test_a_missing_optional_package_names_its_extra(request, monkeypatch, method, extra, missing):
    import diablo_cli.models as models

    base = request.getfixturevalue("gptq_4bit_dir" if method == "gptq" else "quantizable_llama_dir")
    monkeypatch.setattr(models, "_installed", lambda module: module != missing)
    with pytest.raises(DiaBloError, match=rf"needs {missing}: pip install 'diablo-cli\[{extra}\]'"):
        load(base, method=method)


def test_training_refuses_unknown_quantization_and_untrainable_kernels():
    model = tiny_llama()
    model.config.quantization_config = {"quant_method": "awq", "bits": 4}
    with pytest.raises(DiaBloError, match="quantized with awq; diablo-cli trains on GPTQ and bitsandbytes"):
        prepare_quantized_training(model)

    class InferenceOnlyKernel(torch.nn.Module):  # looks like a GPTQ layer, cannot pass gradients
        SUPPORTS_TRAINING = False
        in_features, out_features, bits = 8, 8, 4

        def __init__(self):
            super().__init__()
            self.register_buffer("qweight", torch.zeros(1, 8, dtype=torch.int32))

        def dequantize_weight(self):
            return torch.zeros(8, 8)

    with pytest.raises(DiaBloError, match="layer: the GPTQ kernel InferenceOnlyKernel cannot pass gradients"):
        prepare_quantized_training(torch.nn.ModuleDict({"layer": InferenceOnlyKernel()}))
    assert prepare_quantized_training(tiny_llama()) is None


@pytest.mark.parametrize(
    ("quantization", "message"),
    [
        ({"method": "gptq", "quant_type": "nf4"}, "model.quantization: quant_type applies to method bnb-4bit only"),
        ({"method": "bnb-8bit", "compute_dtype": "bf16"}, "compute_dtype applies to method bnb-4bit only"),
        ({"method": "bnb-4bit", "bits": 4}, "bits checks a GPTQ checkpoint and applies to method gptq only"),
        ({"method": "bnb4"}, "model.quantization.method: Input should be 'none', 'bnb-4bit', 'bnb-8bit' or 'gptq'"),
        ({"method": "bnb-4bit", "quant_typ": "nf4"}, "quant_typ: unknown key; did you mean 'quant_type'?"),
        ({"method": "gptq", "bits": 1}, "model.quantization.bits: 1 is out of range; valid: at least 2 and at most 8"),
    ],
)
def test_recipe_quantization_errors_are_one_line(quantization, message):
    raw = {"base_model": "x", "data": {"datasets": [{"path": "a.jsonl"}]}, "model": {"quantization": quantization}}
    with pytest.raises(DiaBloError) as caught:
        validate_recipe(raw)
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_dry_run_shows_the_quantized_base_and_counts_packed_weights(gptq_4bit_dir, quantizable_llama_dir):
    """`diablo train --dry-run` on a GPTQ base names it and counts the weights its estimate takes as packed
    (every linear layer but the head)."""
    from diablo_cli.quantize.pipeline import quantized_layer_names
    from diablo_cli.train import dry_run

    outputs = {}
    for name, base in (("gptq", gptq_4bit_dir), ("fp32", quantizable_llama_dir)):
        recipe = load_recipe(TINY, [f"base_model={base}", "model.dtype=fp32"])
        console = Console(file=io.StringIO(), width=300)
        dry_run(recipe, console=console, examples=1)
        outputs[name] = console.file.getvalue()
    model = load_base_model(str(quantizable_llama_dir))[0]
    linear = sum(model.get_submodule(name).weight.numel() for name in quantized_layer_names(model))
    assert linear == 3 * (64 * 64 * 2 + 32 * 64 * 2 + 3 * 64 * 192)
    assert f"base: GPTQ 4-bit, group 32 ({linear:,} packed weights)" in outputs["gptq"]
    assert "\nbase: " not in outputs["fp32"] and "packed weights" not in outputs["fp32"]
