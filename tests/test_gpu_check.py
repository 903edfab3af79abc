"""benchmarks/gpu_check.py's parts that need no GPU: its one line on a machine without CUDA, and the table it builds
from test reports and step timings (fed fake results here)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_check  # noqa: E402

JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" tests="3">
<testcase classname="tests.test_cuda" name="test_placement" time="1.25"/>
<testcase classname="tests.test_cuda" name="test_bnb[bf16]" time="3.5">
  <failure message="AssertionError: gradients differ&#10;second line">trace</failure></testcase>
<testcase classname="tests.test_cuda" name="test_gptq" time="0.01">
  <skipped type="pytest.skip" message="needs gptqmodel">skip</skipped></testcase>
</testsuite></testsuites>"""


def test_without_cuda_it_prints_one_line_and_exits_0():
    environment = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py")], capture_output=True, text=True, env=environment
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("\n") == 1 and done.stdout.startswith("gpu-check: no CUDA device here (torch ")
    assert "Traceback" not in done.stderr


def test_junit_report_gives_one_row_per_test_with_its_status():
    rows = gpu_check.junit_rows(JUNIT)
    assert [(r.check, r.status, r.seconds) for r in rows] == [
        ("test_placement", "ok", 1.25),
        ("test_bnb[bf16]", "FAIL", 3.5),
        ("test_gptq", "skip", 0.01),
    ]
    assert rows[1].measured == "AssertionError: gradients differ" and rows[2].measured == "needs gptqmodel"


def test_step_row_computes_rate_and_mfu_and_leaves_mfu_out_for_an_unknown_gpu():
    row = gpu_check.step_row("7B", "diablo", seconds=0.5, tokens=2048, flops=2e14, peak_tflops=1000, memory=3 * 2**30)
    assert row.measured == "500.0 ms/step, 4,096 tokens/s, MFU 40.0%, max allocated 3.00 GiB"
    unknown = gpu_check.step_row("7B", "lora", seconds=0.5, tokens=2048, flops=2e14, peak_tflops=None, memory=0)
    assert "MFU —" in unknown.measured


@pytest.mark.parametrize(
    ("name", "tflops"),
    [
        ("NVIDIA A100-SXM4-80GB", 312),
        ("NVIDIA A100-PCIE-40GB", 312),
        ("NVIDIA H100 80GB HBM3", 989),
        ("NVIDIA H100 PCIe", 756),
        ("NVIDIA H200", 989),
        ("NVIDIA L40S", 362),
        ("NVIDIA L4", 121),
        ("NVIDIA A10G", None),  # not in the table: no MFU rather than a wrong one
        ("Tesla V100-SXM2-16GB", None),
    ],
)
def test_the_gpu_torch_names_maps_to_scalings_table(name, tflops):
    assert gpu_check.gpu_peak_tflops(name) == tflops


def test_the_table_has_every_row_and_counts_them():
    rows = [
        *gpu_check.junit_rows(JUNIT),
        gpu_check.Row("quickstart", "diablo train configs/quickstart.yaml", "ok", 61.0, "dates 40.0% → 93.5%"),
        gpu_check.Row("loss", "(the whole part)", "FAIL", None, "RuntimeError: out of memory"),
    ]
    markdown = gpu_check.results_table(rows, markdown=True).splitlines()
    assert markdown[0] == "| part | check | status | seconds | measured |" and markdown[1] == "|---|---|---|---|---|"
    assert "| quickstart | diablo train configs/quickstart.yaml | ok | 61.0 | dates 40.0% → 93.5% |" in markdown
    assert "| loss | (the whole part) | FAIL | — | RuntimeError: out of memory |" in markdown
    assert markdown[-1] == "2 ok, 2 failed, 1 skipped" and len(markdown) == 2 + len(rows) + 1
    plain = gpu_check.results_table(rows, markdown=False)
    assert "test_bnb[bf16]" in plain and plain.endswith("2 ok, 2 failed, 1 skipped")
