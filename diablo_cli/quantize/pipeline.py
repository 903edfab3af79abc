"""``diablo quantize``: a full-precision base in, a quantized Hugging Face folder out, with a report of what
quantization cost (size, per-layer reconstruction error, perplexity before/after).

Steps: calibration windows → each target layer's input Gram matrix ``XᵀX`` (one set of statistics serves MagR
and the error report) → optional MagR, in place → GPTQ or round-to-nearest (GPTQModel, in a child process) or
bitsandbytes 4-bit → the written folder is loaded back the way training loads it, dequantized, and compared
layer by layer with the original weights. Everything is written into a private staging folder and renamed
into place at the end, so an interrupted run leaves nothing half-written.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ..atomic import write_text_atomic
from ..errors import DiaBloError
from ..models import require_extra
from ..precision import AUTO, choose_dtype, short_name
from ..reading import read_json_object
from ..records import LayerReport, Progress, QuantizeReport
from ..run_folder import QUANTIZE, ModelOutput, check_model_output
from .calibration import DEFAULT_CALIBRATION, build_calibration, check_windows, perplexity
from .dequantize import dequantized_weights
from .gptq import GPTQ_BITS, GPTQJob, run_gptq
from .magr import default_alpha, magr_stats
from .magr import magr as reduce_magnitudes  # `magr` is also quantize_model's flag

METHODS = ("gptq", "rtn", "bnb-4bit")
REPORT_FILE = "diablo_quantize.json"
BNB_BLOCK = 64  # bitsandbytes' 4-bit block: MagR's ℓ∞ groups match it


def quantize_model(
    base: str,
    output: str | Path,
    *,
    method: str = "gptq",
    bits: int = 4,
    group_size: int = 128,
    desc_act: bool = False,
    sym: bool = True,
    damp_percent: float = 0.05,
    magr: bool = False,
    magr_alpha: float | None = None,
    magr_iterations: int = 200,
    calibration: str = DEFAULT_CALIBRATION,
    samples: int = 128,
    seq_len: int = 2048,
    seed: int = 0,
    evaluate: bool = False,
    bnb_quant_type: str = "nf4",
    bnb_double_quant: bool = True,
    bnb_compute_dtype: str = "bf16",
    overwrite: bool = False,
    trust_remote_code: bool = False,
    revision: str | None = None,
    progress: Progress | None = None,
) -> QuantizeReport:
    """Quantize ``base`` into ``output`` (see the module docstring); returns the report also written there as
    ``diablo_quantize.json``."""
    from transformers import AutoTokenizer

    from ..models import local_model_folder

    progress = progress or (lambda phase, done, total: None)
    output = Path(output)
    _check_options(method, bits, group_size, bnb_quant_type, bnb_compute_dtype, magr_iterations, samples, seq_len)
    check_model_output(output, command=QUANTIZE, overwrite=overwrite)
    base_dir = local_model_folder(base, revision=revision, trust_remote_code=trust_remote_code)
    report = QuantizeReport(
        base=base,
        output=str(output),
        method=method,
        bits=4 if method == "bnb-4bit" else bits,
        group_size=BNB_BLOCK if method == "bnb-4bit" else group_size,
        desc_act=desc_act and method == "gptq",
    )
    clock = _Clock(report)

    tokenizer = AutoTokenizer.from_pretrained(base_dir, trust_remote_code=trust_remote_code)
    progress("reading calibration text", 0, None)
    data = build_calibration(calibration, tokenizer, samples=samples, seq_len=seq_len, seed=seed)
    if evaluate and not data.held_out:
        raise DiaBloError(
            f"--eval: the held-out tenth of --calibration {calibration} is shorter than --seq-len {seq_len}; "
            "lower --seq-len or use a larger source"
        )
    report.calibration = {
        "source": calibration,
        "samples": samples,
        "seq_len": seq_len,
        "stream_tokens": data.stream_tokens,
        "held_out_tokens": sum(w.numel() for w in data.held_out),
    }
    clock.lap("calibration data")

    model = _load_full_precision(base_dir, trust_remote_code)
    targets = quantized_layer_names(model)
    if evaluate:
        progress("perplexity before", 0, None)
        report.perplexity_before = perplexity(model, data.held_out)
        clock.lap("perplexity before")
    from .grams import collect_input_grams

    grams = collect_input_grams(
        model,
        data.batches(data.windows),
        targets,
        progress=lambda done, total: progress("input statistics (XᵀX per layer)", done, total),
    )
    clock.lap("input statistics")

    with ModelOutput(output, command=QUANTIZE, overwrite=overwrite) as writer:
        report.cleaned = writer.cleaned
        staging = writer.staging("quantizing")
        scratch = writer.staging("source")
        dequantized_file = scratch / "dequantized.safetensors"
        source_dir = base_dir
        magr_stats: dict[str, tuple[float, float, float]] = {}
        if magr:
            magr_group = _magr_group_size(method, group_size)
            alpha = magr_alpha if magr_alpha is not None else default_alpha(magr_group)
            report.magr = {"alpha": alpha, "iterations": magr_iterations, "group_size": magr_group}
            magr_stats = _apply_magr(model, grams, alpha, magr_iterations, magr_group, progress)
            clock.lap("MagR")
            if evaluate:
                progress("perplexity after MagR", 0, None)
                report.perplexity_magr = perplexity(model, data.held_out)
                clock.lap("perplexity after MagR")
            progress("writing the MagR weights for the quantizer", 0, None)
            model.save_pretrained(scratch, safe_serialization=True)
            tokenizer.save_pretrained(scratch)
            source_dir = scratch
        layers = _decoder_layer_count(model)
        del model

        if method == "bnb-4bit":
            _save_bnb_4bit(source_dir, staging, bnb_quant_type, bnb_double_quant, bnb_compute_dtype, trust_remote_code)
            tokenizer.save_pretrained(staging)
        else:
            device = "cuda" if torch.cuda.is_available() else "cpu"
            calibration_dtype = choose_dtype(AUTO, device=device)
            report.calibration["dtype"] = short_name(calibration_dtype.name)
            job = GPTQJob(
                source_dir=str(source_dir),
                output_dir=str(staging),
                method=method,
                bits=bits,
                group_size=group_size,
                desc_act=desc_act,
                sym=sym,
                damp_percent=damp_percent,
                calibration_file=None,
                batch_size=1,
                trust_remote_code=trust_remote_code,
                device=device,
                dtype=calibration_dtype.name,
                dequantized_file=str(dequantized_file),
            )
            log = run_gptq(
                job,
                data.windows if method == "gptq" else None,
                layers=layers,
                progress=progress,
                failure_log=output.parent / f"{output.name}.quantize-failed.log",
            )
            report.log = str(output / log.name)
        clock.lap("quantize")

        progress("checking the written model", 0, None)
        if method == "bnb-4bit":
            save_file(dequantized_weights(staging, trust_remote_code), str(dequantized_file))
        model = _load_full_precision(base_dir, trust_remote_code)
        report.layers = _swap_in_dequantized(model, dequantized_file, grams, magr_stats)
        if evaluate:
            progress("perplexity after", 0, None)
            report.perplexity_after = perplexity(model, data.held_out)
        del model
        clock.lap("check")
        report.size_before_bytes = _weights_bytes(base_dir)
        report.size_after_bytes = _weights_bytes(staging)
        write_text_atomic(staging / REPORT_FILE, json.dumps(asdict(report), indent=2) + "\n")
        writer.publish(staging)
    return report


def read_quantize_report(folder: str | Path) -> QuantizeReport:
    """The report ``diablo quantize`` left in a folder it wrote."""
    document = read_json_object(Path(folder) / REPORT_FILE, "quantize report")
    layers = [LayerReport(**layer) for layer in document.pop("layers", [])]
    return QuantizeReport(**document, layers=layers)


def quantized_layer_names(model: nn.Module) -> list[str]:
    """The linear layers a quantizer replaces: every ``nn.Linear`` but the output head (GPTQModel and
    bitsandbytes keep the head in full precision; so does the report)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [
        name for name, module in model.named_modules() if isinstance(module, nn.Linear) and module is not head and name
    ]


def _check_options(
    method: str,
    bits: int,
    group_size: int,
    quant_type: str,
    compute_dtype: str,
    magr_iterations: int,
    samples: int,
    seq_len: int,
) -> None:
    if method not in METHODS:
        raise DiaBloError(f"--method {method!r}: choose one of {', '.join(METHODS)}")
    if method in ("gptq", "rtn"):
        require_extra("gptq", f"--method {method}")
        if bits not in GPTQ_BITS:
            raise DiaBloError(f"--bits {bits}: {method} takes {', '.join(map(str, GPTQ_BITS))}")
        if group_size != -1 and (group_size < 16 or group_size & (group_size - 1)):
            raise DiaBloError(f"--group-size {group_size}: a power of two ≥ 16 (e.g. 32, 64, 128), or -1 for none")
    else:
        if bits != 4:
            raise DiaBloError(f"--bits {bits}: bnb-4bit is 4-bit; use --method gptq or rtn for other widths")
        require_extra("bnb", "--method bnb-4bit")
        if quant_type not in ("nf4", "fp4"):
            raise DiaBloError(f"--bnb-quant-type {quant_type!r}: nf4 or fp4")
        if compute_dtype not in ("fp32", "bf16", "fp16"):
            raise DiaBloError(f"--bnb-compute-dtype {compute_dtype!r}: fp32, bf16 or fp16")
    if magr_iterations < 1:
        raise DiaBloError(f"--magr-iterations {magr_iterations}: at least 1")
    check_windows(samples, seq_len)


def _magr_group_size(method: str, group_size: int) -> int | None:
    """MagR's ℓ∞ groups follow the quantizer's: per output channel, or per quantization group."""
    if method == "bnb-4bit":
        return BNB_BLOCK
    return None if group_size == -1 else group_size


def _apply_magr(
    model: nn.Module,
    grams: dict[str, torch.Tensor],
    alpha: float,
    iterations: int,
    group_size: int | None,
    progress: Progress,
) -> dict[str, tuple[float, float, float]]:
    """MagR on every layer in place; per layer: (output error of W', mean channel max |W| before, after)."""
    stats = {}
    for index, (name, gram) in enumerate(grams.items()):
        progress("MagR: reducing weight magnitudes", index, len(grams))
        weight = model.get_submodule(name).weight.data
        gram = gram.to(weight.device)
        ragged = group_size is not None and weight.shape[1] % group_size != 0
        group = None if ragged else group_size  # a ragged last group: per-channel for this layer
        reduced = reduce_magnitudes(weight, gram, alpha=alpha, iterations=iterations, group_size=group)
        change = magr_stats(weight, reduced, gram)  # per channel: what the report shows
        stats[name] = (change.output_error, change.mean_range_before, change.mean_range_after)
        weight.copy_(reduced)
    progress("MagR: reducing weight magnitudes", len(grams), len(grams))
    return stats


def _swap_in_dequantized(
    model: nn.Module,
    dequantized_file: Path,
    grams: dict[str, torch.Tensor],
    magr_stats: dict[str, tuple[float, float, float]],
) -> list[LayerReport]:
    """Put each layer's dequantized weight into the freshly loaded ORIGINAL model, measuring on the way how
    far it is from the original weight (so MagR's own change counts as part of the error). The model then
    computes exactly what the quantized one does, in full-precision activations."""
    from .grams import relative_output_error

    reports = []
    with safe_open(str(dequantized_file), framework="pt") as reader:
        stored = set(reader.keys())
        for name, gram in grams.items():
            if name not in stored:
                continue
            weight = model.get_submodule(name).weight
            quantized = reader.get_tensor(name).to(weight.device)
            error = relative_output_error(weight, quantized, gram)
            magr_error, before, after = magr_stats.get(name, (None, None, None))
            reports.append(LayerReport(name, error, magr_error, before, after))
            with torch.no_grad():
                weight.copy_(quantized.to(weight.dtype))
    if not reports:
        raise DiaBloError("the quantized model has none of the expected quantized layers; nothing was written")
    return reports


def _load_full_precision(base_dir: Path, trust_remote_code: bool) -> nn.Module:
    """The base in fp32 on CPU (MagR and the statistics want full precision), in its own dtype on a GPU."""
    from ..models import base_quantization, load_model_folder

    if base_quantization(read_json_object(base_dir / "config.json", "model config")) is not None:
        raise DiaBloError(f"{base_dir} is already quantized; diablo quantize needs a full-precision base")
    dtype = None if torch.cuda.is_available() else torch.float32
    return load_model_folder(base_dir, dtype, trust_remote_code=trust_remote_code)


def _save_bnb_4bit(
    source_dir: Path, out: Path, quant_type: str, double_quant: bool, compute_dtype: str, trust_remote_code: bool
) -> None:
    """Load with bitsandbytes 4-bit quantization and save its serialised form (packed weights + quant state)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from ..models import TORCH_DTYPES

    config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=getattr(torch, TORCH_DTYPES[compute_dtype]),
    )
    model = AutoModelForCausalLM.from_pretrained(
        source_dir,
        quantization_config=config,
        dtype=getattr(torch, TORCH_DTYPES[compute_dtype]),
        use_safetensors=True,
        trust_remote_code=trust_remote_code,
    )
    model.save_pretrained(out, safe_serialization=True)


def _decoder_layer_count(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    return int(getattr(config, "num_hidden_layers", 0) or 0)


def _weights_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.glob("*.safetensors"))


class _Clock:
    """Seconds per phase, recorded into the report as the run goes."""

    def __init__(self, report: QuantizeReport) -> None:
        self.report = report
        self.last = time.perf_counter()

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        self.report.seconds[phase] = round(now - self.last, 2)
        self.last = now
