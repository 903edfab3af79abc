"""dtype auto: bf16 only where the hardware computes it, fp32 elsewhere, and honest words about speed and memory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from diablo_cli import precision
from diablo_cli.errors import DiaBloError
from diablo_cli.precision import AUTO, Hardware, choose_dtype

ROOT = Path(__file__).parents[1]
AVX2 = Hardware("cpu", "AMD EPYC 7B12", "AVX2", bf16=False, fp16=False)
SAPPHIRE = Hardware("cpu", "Intel Xeon Platinum 8480", "AMX", bf16=True, fp16=True)
V100 = Hardware("cuda", "Tesla V100", "sm_70", bf16=False, fp16=True)
A100 = Hardware("cuda", "NVIDIA A100", "sm_80", bf16=True, fp16=True)


@pytest.fixture
def machine(monkeypatch):
    """Pretend to run on the given hardware; the slow-path timing returns a fixed factor."""

    def use(hw: Hardware, slowdown: float = 120.0) -> None:
        monkeypatch.setattr(precision, "hardware", lambda device=None: hw)
        monkeypatch.setattr(precision, "slowdown", lambda short: slowdown)

    return use


@pytest.mark.parametrize(
    ("hw", "stored", "expected"),
    [
        (AVX2, "bfloat16", "float32"),  # the slow path is never chosen, whatever the checkpoint says
        (AVX2, "float16", "float32"),
        (SAPPHIRE, "float32", "bfloat16"),  # bf16 where native, even for an fp32 checkpoint
        (A100, "float16", "bfloat16"),
        (V100, "float16", "float16"),  # native fp16 and a checkpoint known to fit its range
        (V100, "bfloat16", "float32"),  # a bf16-trained model may overflow fp16
        (V100, None, "float32"),
    ],
)
def test_auto_picks_by_hardware(machine, hw, stored, expected):
    machine(hw)
    choice = choose_dtype(AUTO, stored=stored)
    assert choice.name == expected and choice.warning is None
    assert choice.describe().startswith(f"dtype: {precision.short_name(expected)} (auto: {hw.name}")
    assert choose_dtype(None, stored=stored) == choice


def test_explicit_request_without_native_support_warns_with_the_measured_factor(machine):
    machine(AVX2, slowdown=97.4)
    choice = choose_dtype("bf16")
    assert choice.name == "bfloat16"  # still runs as asked
    assert choice.warning == (
        "AMD EPYC 7B12 (AVX2) has no native bf16: a bf16 matmul measured 97× slower than fp32 here; "
        "dtype auto picks fp32 here"
    )
    machine(SAPPHIRE)
    assert choose_dtype("bfloat16").warning is None and choose_dtype("fp32").warning is None


def test_unknown_dtype_is_one_line():
    with pytest.raises(DiaBloError, match="dtype 'fp8': choose one of auto, fp32, bf16, fp16"):
        choose_dtype("fp8")


def test_this_machine_is_described_as_torch_sees_it():
    hw = precision.hardware("cpu")
    assert hw.bf16 == torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert hw.capability == torch.backends.cpu.get_cpu_capability()
    line = precision.describe_machine()
    assert hw.name in line and hw.capability in line and ("native bf16 yes" in line) == hw.bf16


def test_slowdown_is_a_real_timing():
    factor = precision.slowdown.__wrapped__("bf16", size=128)
    assert 0 < factor < 10_000


def test_weights_that_do_not_fit_in_auto_fp32_are_refused_with_what_fits(machine, monkeypatch):
    machine(AVX2)
    monkeypatch.setattr(precision, "available_memory", lambda device=None: 20 * 2**30)
    choice = choose_dtype(AUTO)
    with pytest.raises(DiaBloError) as caught:
        precision.check_weights_fit("base model llama2-7b", 6_738_415_616, choice)
    message = str(caught.value)
    assert "\n" not in message
    assert "6.7B parameters need 25.1 GiB in fp32 (auto: AMD EPYC 7B12 (AVX2) has no native bf16)" in message
    assert "20.0 GiB of memory is available" in message
    assert "model.dtype: bf16 (12.6 GiB, on this machine's slow bf16 path)" in message and "bnb-4bit" in message
    precision.check_weights_fit("base model llama2-7b", 6_738_415_616, choose_dtype("bf16"))  # asked: no refusal
    precision.check_weights_fit("base model smollm2", 134_515_008, choice)  # fits


def test_train_refuses_a_base_that_does_not_fit_before_loading_weights(machine, monkeypatch, tmp_path):
    """The check runs on the config alone (a meta-device skeleton): the weights are never read."""
    from diablo_cli.models import load_base_model, tiny_model_dir

    machine(AVX2)
    monkeypatch.setattr(precision, "available_memory", lambda device=None: 100_000)  # 0.6 MB of fp32 weights fit
    with pytest.raises(DiaBloError, match=r"base model tiny-random-llama: \d\.\dM parameters need \d+\.\d MiB in fp32"):
        load_base_model("tiny-random-llama")
    model, _ = load_base_model(str(tiny_model_dir()), dtype="fp32")  # an explicit dtype is not second-guessed
    assert model.dtype == torch.float32


def test_load_base_model_resolves_auto_and_reports_the_choice(machine):
    from diablo_cli.models import load_base_model

    heard = []
    machine(AVX2)
    model, _ = load_base_model("tiny-random-llama", on_dtype=heard.append)
    assert model.dtype == torch.float32 and heard[0].name == "float32"
    machine(SAPPHIRE)
    model, _ = load_base_model("tiny-random-llama", dtype="auto", on_dtype=heard.append)
    assert model.dtype == torch.bfloat16 and heard[1].requested == AUTO


def test_quantize_calibrates_in_the_auto_dtype(machine, tmp_path, monkeypatch):
    """GPTQModel's own default is bf16 on every CPU; the job carries the auto choice instead."""
    from diablo_cli.quantize import gptq, pipeline

    machine(AVX2)
    jobs = []

    def fake_run_gptq(job, windows, **kwargs):
        jobs.append(job)
        raise DiaBloError("stop here")

    monkeypatch.setattr(pipeline, "run_gptq", fake_run_gptq)
    from diablo_cli.models import tiny_model_dir

    with pytest.raises(DiaBloError, match="stop here"):
        pipeline.quantize_model(
            str(tiny_model_dir()), tmp_path / "q", method="rtn", bits=4, group_size=32, evaluate=False
        )
    assert jobs[0].dtype == "float32"
    assert isinstance(gptq.GPTQJob(**{**jobs[0].__dict__}).dtype, str)


def test_inspect_estimates_in_the_auto_dtype_of_this_machine(machine):
    from diablo_cli.inspection import inspect_model

    machine(AVX2)
    here = inspect_model("llama2-7b", blocks=[64])
    assert here.memory_settings["dtype"] == "float32" and "AVX2" in here.memory_settings["dtype_reason"]
    machine(SAPPHIRE)
    assert inspect_model("llama2-7b", blocks=[64]).memory_settings["dtype"] == "bfloat16"
    machine(AVX2)
    sharded = inspect_model("llama2-7b", blocks=[64], gpus=8)  # planning a GPU run: a GPU's dtype
    assert sharded.memory_settings["dtype"] == "bfloat16"


def run_dry(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "diablo_cli", "train", str(ROOT / "configs" / "quickstart.yaml"), "--dry-run", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200", **env},
    )


# oneDNN limited to AVX2: PyTorch then reports no native bf16, as on an AVX2-only CPU (checked in the test).
AVX2_ONLY = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}


@pytest.mark.slow
def test_quickstart_plan_says_what_auto_chose_on_an_avx2_cpu(smollm2_dir):
    probe = subprocess.run(
        [sys.executable, "-c", "import torch; print(torch.ops.mkldnn._is_mkldnn_bf16_supported())"],
        capture_output=True,
        text=True,
        env={**os.environ, **AVX2_ONLY},
    )
    if probe.stdout.strip() != "False":
        pytest.skip("this PyTorch ignores ONEDNN_MAX_CPU_ISA")
    auto = run_dry(env=AVX2_ONLY)
    assert auto.returncode == 0, auto.stderr
    assert "dtype: fp32 (auto: " in auto.stdout and "(AVX2) has no native bf16)" in auto.stdout
    assert "weights 0.50" in auto.stdout  # the estimate follows the choice: 134.5M fp32 weights
    forced = run_dry("--set", "model.dtype=bf16", env=AVX2_ONLY)
    assert forced.returncode == 0, forced.stderr
    assert "dtype: bf16 (as requested)" in forced.stdout
    assert (
        "has no native bf16: a bf16 matmul measured" in forced.stdout and "dtype auto picks fp32 here" in forced.stdout
    )


def test_shipped_recipes_default_to_auto_or_say_why_not():
    """The quickstart and the GPTQ quickstart leave the choice to the hardware; paper recipes keep the paper's."""
    import yaml

    for name in ("quickstart.yaml", "quickstart-gptq.yaml"):
        assert yaml.safe_load((ROOT / "configs" / name).read_text())["model"]["dtype"] == "auto", name
    assert json.loads(json.dumps(yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())))["model"] == {
        "dtype": "fp32"
    }
