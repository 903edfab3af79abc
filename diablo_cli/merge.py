"""``diablo merge``: fold an adapter into its base and write a standalone Hugging Face model, verified.

The merge streams the base's safetensors shard by shard: each tensor is read, the blocks that belong to
it are added in fp32, the result is cast to the output dtype and written, so peak memory stays near one
output shard plus the adapter, whatever the model's size. Everything is written into a hidden staging
folder beside the output; only a merge whose logits match base+adapter is renamed into place.

A quantized base (bitsandbytes, GPTQ) cannot be streamed: its packed weights are loaded, dequantized to
the output dtype, merged in memory and saved as a full-precision model (see :func:`merge_in_memory`).
"""

from __future__ import annotations

import json
import logging
import os
import resource
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from .adapter import load_adapter, merge_diablo, read_adapter_config
from .adapter.files import DAMAGED_ADAPTER_ADVICE, WEIGHTS_FILE, check_against_base
from .adapter.layer import ADAPTER_PARAMETER, BlockLayout, dense_update, is_conv1d
from .adapter.model import tied_parameter_names
from .errors import DiaBloError
from .methods import (
    attach_saved_adapter,
    is_adapter_parameter,
    peft_adapter_config,
    recorded_base,
    saved_adapter_disabled,
)
from .model_card import MODEL_CARD, write_model_card
from .models import (
    DAMAGED_MODEL_ADVICE,
    TORCH_DTYPES,
    base_quantization,
    compute_device,
    load_model_folder,
    local_model_folder,
    skeleton_model,
)
from .reading import open_safetensors, read_json_object
from .records import MergeReport, Progress, Verification
from .run_folder import ADAPTER_CONFIG, MERGE, TOKENIZER_CONFIG, TOKENIZER_FILES, ModelOutput, check_model_output

log = logging.getLogger("diablo_cli")

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_COPIED_SUFFIXES = (".json", ".model", ".txt", ".jinja", ".tiktoken", ".py")
_NOT_COPIED = {INDEX_FILE, ADAPTER_CONFIG, MODEL_CARD}

# Largest accepted |merged − (base+adapter)| over max |logit| of base+adapter on the probe batch, both run
# in fp32. Merging rounds each weight once to the output dtype, so that is all the difference should be;
# the tolerance is the larger of these and three times what rounding the bare base to the dtype does on the
# same probe (measured each run). On SmolLM2 (fp32 base) a merge into bf16 differs by 1.2e-2 with a
# floor of 2.1e-2, while scaling one of the 32 blocks of one layer by 3 moves the logits by only 2e-3:
# in bf16 or fp16 the check catches wiring errors, and only an fp32 merge can resolve a single block.
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 3e-3}
PROBE_SHAPE = (2, 32)


def merge_adapter(
    adapter_dir: str | os.PathLike,
    output_dir: str | os.PathLike | None = None,
    *,
    base: str | None = None,
    dtype: str | None = None,
    max_shard_size: str | int = "5GB",
    verify: bool = True,
    overwrite: bool = False,
    revision: str | None = None,
    trust_remote_code: bool = False,
    progress: Progress | None = None,
) -> MergeReport:
    """Merge the adapter in ``adapter_dir`` into its base and write a Hugging Face model to ``output_dir``.

    ``base`` defaults to the base recorded in the adapter; ``dtype`` (fp32/bf16/fp16) to the base's own.
    With ``verify`` the merged model must reproduce base+adapter logits within a dtype tolerance, or
    nothing is written. ``output_dir`` defaults to ``<adapter_dir>-merged``. A base that needs its own
    modelling code is refused unless ``trust_remote_code``.
    """
    started = time.perf_counter()
    adapter_dir = Path(adapter_dir)
    peft_config = peft_adapter_config(adapter_dir)
    document = peft_config if peft_config is not None else read_adapter_config(adapter_dir)
    base_name = base or recorded_base(adapter_dir)
    if not base_name:
        raise DiaBloError(f"{adapter_dir}: the adapter does not record its base model; pass --base")
    output_dir = Path(output_dir) if output_dir is not None else default_output_dir(adapter_dir)
    _check_output_dir(output_dir, adapter_dir, overwrite=overwrite)
    shard_limit = parse_shard_size(max_shard_size)
    if dtype is not None and dtype not in TORCH_DTYPES:
        raise DiaBloError(f"--dtype {dtype!r}: choose one of {', '.join(TORCH_DTYPES)}")
    base_dir = local_model_folder(base_name, revision=revision, trust_remote_code=trust_remote_code)
    base_config = read_json_object(base_dir / "config.json", "model config")
    quantization = base_quantization(base_config)
    quantized = quantization["method"] if quantization else None
    out_dtype = _output_dtype(dtype, base_dir, base_config, quantized)
    report = MergeReport(output_dir, base_name, base_dir, _dtype_name(out_dtype), dequantized=quantized)

    progress = progress or (lambda phase, done, total: None)
    with ModelOutput(output_dir, command=MERGE, overwrite=overwrite) as output:
        report.cleaned = output.cleaned
        staging = output.staging("merging")
        if peft_config is not None:
            if quantized:
                raise DiaBloError(
                    f"{adapter_dir} is a PEFT {peft_config['peft_type']} adapter on a {quantized} base; diablo merge "
                    "folds LoRA/DoRA into full-precision bases only: merge into the unquantized model (--base)"
                )
            progress(f"merging the PEFT {peft_config['peft_type']} adapter in memory", 0, None)
            merge_peft_in_memory(
                adapter_dir, base_dir, staging, out_dtype, shard_limit, report, verify=verify, trust=trust_remote_code
            )
        elif quantized:
            progress(f"dequantizing the {quantized} base and merging in memory", 0, None)
            merge_in_memory(
                adapter_dir,
                base_dir,
                base_config,
                staging,
                out_dtype,
                shard_limit,
                report,
                verify=verify,
                trust=trust_remote_code,
            )
        else:
            plan = plan_streaming_merge(adapter_dir, document, base_dir, trust=trust_remote_code)
            stream_merge(plan, staging, out_dtype, shard_limit, report, progress=progress)
            _write_config(base_config, staging, out_dtype, untie=bool(report.untied))
            if verify:
                progress("verifying: base+adapter vs merged logits", 0, None)
                report.verification = verify_merge(adapter_dir, base_dir, staging, out_dtype, trust=trust_remote_code)
        _copy_side_files(base_dir, adapter_dir, staging)
        if report.verification is not None and not report.verification.passed:
            check = report.verification
            raise DiaBloError(
                f"verification failed: the merged model's logits differ from base+adapter by {check.max_abs:.3g} "
                f"(relative {check.max_relative:.2e}, tolerance {check.tolerance:.0e} for {report.dtype}); "
                f"nothing was written to {output_dir}"
            )
        report.seconds = time.perf_counter() - started
        report.peak_rss_bytes = peak_rss_bytes()
        write_model_card(staging, report, adapter_dir, document)
        output.publish(staging)
    return report


def default_output_dir(adapter_dir: str | os.PathLike) -> Path:
    """Where ``diablo merge`` writes when not told: ``ADAPTER-merged`` beside the adapter."""
    adapter_dir = Path(adapter_dir)
    return adapter_dir.with_name(adapter_dir.name + "-merged")


@dataclass
class MergePlan:
    """Where each adapted weight lives in the base's shards, and how to add its blocks."""

    shards: list[Path]
    blocks: dict[str, torch.Tensor]  # weight key in the output -> the adapter's (N, d1, d2) blocks
    features: dict[str, tuple[int, int]]  # weight key -> (in_features, out_features)
    transposed: set[str]  # GPT-2 Conv1D weights, stored (in, out)
    sources: dict[str, str]  # output weight key -> key it is read from (differs for a tied lm_head)
    tied: set[str]  # adapted weights the base ties to another module: the merged model unties them
    tensor_count: int  # tensors in the base's shards (for progress)


def plan_streaming_merge(
    adapter_dir: Path, document: dict[str, Any], base_dir: Path, *, trust: bool = False
) -> MergePlan:
    """Check the adapter against the base's architecture (built on the meta device: no weights read) and
    find each adapted weight in the base's safetensors; the first mismatch is named."""
    from transformers import AutoConfig

    skeleton = skeleton_model(AutoConfig.from_pretrained(base_dir, trust_remote_code=trust), trust_remote_code=trust)
    targets = check_against_base(skeleton, document, adapter_dir)
    modules = dict(skeleton.named_modules())
    shards, keys = checkpoint_keys(base_dir)
    aliases = tied_parameter_names(skeleton)

    plan = MergePlan(shards, {}, {}, set(), {}, set(), len(keys))
    with open_safetensors(adapter_dir / WEIGHTS_FILE, DAMAGED_ADAPTER_ADVICE) as weights:
        for target in targets:
            key = f"{target.name}.weight"
            source = key if key in keys else next((alias for alias in aliases.get(key, ()) if alias in keys), None)
            if source is None:
                sample = ", ".join(sorted(keys)[:3])
                raise DiaBloError(
                    f"the base's safetensors have no tensor {key} for the adapted module {target.name} "
                    f"(the checkpoint's keys look like: {sample}, …)"
                )
            plan.blocks[key] = weights.get_tensor(f"{target.name}.{ADAPTER_PARAMETER}")
            plan.features[key] = (target.in_features, target.out_features)
            plan.sources[key] = source
            if aliases.get(key):
                plan.tied.add(key)
            if is_conv1d(modules[target.name]):
                plan.transposed.add(key)
    return plan


def stream_merge(
    plan: MergePlan,
    out: Path,
    dtype: torch.dtype,
    shard_limit: int,
    report: MergeReport,
    *,
    progress: Progress | None = None,
) -> None:
    """Read the base one tensor at a time, add the blocks where they belong, and write output shards of at
    most ``shard_limit`` bytes (a single tensor larger than that gets a shard of its own)."""
    writer = _ShardWriter(out, shard_limit)
    tied_outputs = {key: source for key, source in plan.sources.items() if key != source}
    done = 0
    for shard in plan.shards:
        with open_safetensors(shard, DAMAGED_MODEL_ADVICE) as reader:
            for key in list(reader.keys()):
                tensor = reader.get_tensor(key)
                if key in plan.blocks:
                    tensor = _merge_one(key, tensor, plan, dtype, report)
                elif tensor.is_floating_point():
                    tensor = tensor.to(dtype)
                writer.add(key, tensor)
                for output_key in [k for k, source in tied_outputs.items() if source == key]:
                    writer.add(output_key, _merge_one(output_key, reader.get_tensor(key), plan, dtype, report))
                done += 1
                if progress:
                    progress(f"tensors ({shard.name})", done, plan.tensor_count)
    report.tensors, report.shards, report.bytes_written = writer.close()
    report.untied = sorted(plan.tied)


def _merge_one(key: str, weight: torch.Tensor, plan: MergePlan, dtype: torch.dtype, report: MergeReport):
    blocks = plan.blocks[key]
    delta = dense_update(blocks.float(), *plan.features[key])
    if key in plan.transposed:
        delta = delta.T
    merged = (weight.float() + delta).to(dtype)
    _count_changes(report, merged, weight.to(dtype), BlockLayout(*plan.features[key], blocks.shape[0]))
    return merged.contiguous()


class _ShardWriter:
    """Collects tensors and writes ``model-XXXXX-of-YYYYY.safetensors`` files (or one ``model.safetensors``)
    with the index transformers reads; holds at most one shard in memory."""

    def __init__(self, out: Path, limit: int) -> None:
        self.out, self.limit = out, limit
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.files: list[tuple[Path, list[str]]] = []
        self.count = 0
        self.total_bytes = 0

    def add(self, key: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.limit:
            self._flush()
        self.pending[key] = tensor
        self.pending_bytes += size
        self.count += 1
        self.total_bytes += size

    def _flush(self) -> None:
        path = self.out / f".shard-{len(self.files):05d}.safetensors"
        save_file(self.pending, str(path), metadata={"format": "pt"})
        self.files.append((path, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> tuple[int, int, int]:
        """Write what is pending and name the files; returns (tensors, shards, bytes)."""
        if self.pending or not self.files:
            self._flush()
        summary = (self.count, len(self.files), self.total_bytes)
        if len(self.files) == 1:
            self.files[0][0].rename(self.out / SINGLE_FILE)
            return summary
        weight_map = {}
        for index, (path, keys) in enumerate(self.files, start=1):
            name = f"model-{index:05d}-of-{len(self.files):05d}.safetensors"
            path.rename(self.out / name)
            weight_map.update(dict.fromkeys(keys, name))
        index_document = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.out / INDEX_FILE).write_text(json.dumps(index_document, indent=2) + "\n", encoding="utf-8")
        return summary


def verify_merge(
    adapter_dir: Path, base_dir: Path, merged_dir: Path, dtype: torch.dtype, *, trust: bool = False
) -> Verification:
    """Run a probe batch through base+adapter and through the merged folder loaded by plain transformers,
    one model at a time (verifying never holds two models in memory), and compare the logits.

    Both run in fp32 (the merged weights upcast exactly), so activation rounding does not blur the
    comparison: what remains is the one rounding of the merged weights to ``dtype``."""
    reference = load_model_folder(base_dir, torch.float32, trust_remote_code=trust)
    load_adapter(reference, adapter_dir)
    outputs = reference_outputs(reference, dtype)
    del reference
    return compare_with_folder(outputs, merged_dir, dtype, trust=trust)


@dataclass
class ReferenceOutputs:
    """What base+adapter gives on the probe batch, kept while the models come and go."""

    probe: dict[str, torch.Tensor]
    expected: torch.Tensor  # logits with the adapters
    bare: torch.Tensor  # logits of the bare base
    rounding_floor: float  # max |logit change| from rounding the bare base's weights to the output dtype


def reference_outputs(model, dtype: torch.dtype) -> ReferenceOutputs:
    """Probe an fp32 adapted model; then, for a lower output dtype, round its base weights to that dtype
    in place and measure how far that alone moves the bare base's logits: the scale of error that storing
    the model in ``dtype`` brings anyway, against which the merge is judged."""
    probe = _probe_inputs(model.config)
    with torch.no_grad():
        expected = model(**probe).logits.float().cpu()
        with saved_adapter_disabled(model):
            bare = model(**probe).logits.float().cpu()
            floor = 0.0
            if dtype != torch.float32:
                for name, parameter in model.named_parameters():
                    if parameter.is_floating_point() and not is_adapter_parameter(name):
                        parameter.copy_(parameter.to(dtype).float())
                floor = (model(**probe).logits.float().cpu() - bare).abs().max().item()
    return ReferenceOutputs(probe, expected, bare, floor)


def compare_with_folder(
    reference: ReferenceOutputs, merged_dir: Path, dtype: torch.dtype, *, trust: bool = False
) -> Verification:
    """Load ``merged_dir`` as any user would (plain transformers; weights upcast to fp32) and score it."""
    merged = load_model_folder(merged_dir, torch.float32, trust_remote_code=trust)
    with torch.no_grad():
        actual = merged(**reference.probe).logits.float().cpu()
    expected = reference.expected
    scale = expected.abs().max().item() or 1.0
    difference = (actual - expected).abs().max().item()
    return Verification(
        max_abs=difference,
        max_relative=difference / scale,
        adapter_effect=(expected - reference.bare).abs().max().item(),
        tolerance=max(TOLERANCE.get(dtype, 1e-2), 3 * reference.rounding_floor / scale),
        tokens=reference.probe["input_ids"].numel(),
        rounding_floor=reference.rounding_floor / scale,
    )


def merge_peft_in_memory(
    adapter_dir: Path,
    base_dir: Path,
    out: Path,
    dtype: torch.dtype,
    shard_limit: int,
    report: MergeReport,
    *,
    verify: bool,
    trust: bool = False,
) -> None:
    """The path for a ``type: lora | dora`` run: PEFT's own merge (``merge_and_unload``) on the fp32 base, saved
    in ``dtype`` and checked against base+adapter the same way as a DiaBlo merge."""
    model = attach_saved_adapter(load_model_folder(base_dir, torch.float32, trust_remote_code=trust), adapter_dir)
    reference = reference_outputs(model, dtype) if verify else None
    merged = model.merge_and_unload()
    merged.to(dtype).save_pretrained(out, safe_serialization=True, max_shard_size=shard_limit)
    shards = sorted(out.glob("*.safetensors"))
    report.shards, report.bytes_written = len(shards), sum(p.stat().st_size for p in shards)
    report.tensors = len(merged.state_dict())
    del model, merged
    if reference is not None:
        report.verification = compare_with_folder(reference, out, dtype, trust=trust)


def merge_in_memory(
    adapter_dir: Path,
    base_dir: Path,
    base_config: dict[str, Any],
    out: Path,
    dtype: torch.dtype,
    shard_limit: int,
    report: MergeReport,
    *,
    verify: bool,
    trust: bool = False,
) -> None:
    """The path for quantized bases: load them as transformers does, dequantize every quantized layer
    (to fp32, like all merge arithmetic), keep base+adapter as the reference, merge with
    :func:`merge_diablo`, and save in ``dtype``."""
    from .adapter import adapted_layers
    from .quantize import dequantized_layers, replace_layers

    model = load_model_folder(base_dir, None, trust_remote_code=trust)
    load_adapter(model, adapter_dir)
    dense = dequantized_layers(model, torch.float32)  # before any forward pass (see dequantized_layers)
    if verify:
        probe = _probe_inputs(model.config)
        with torch.no_grad():
            quantized = model(**probe).logits.float().cpu()
    replace_layers(model, dense)
    model.float()
    report.dequantized = f"{report.dequantized}, {len(dense)} layers dequantized"
    if verify:
        # The merge is checked against the dequantized base + adapter; how far dequantizing alone moved
        # the logits (the quantized kernels round activations too) is reported beside it.
        reference = reference_outputs(model, dtype)
        report.dequantization_gap = (reference.expected - quantized).abs().max().item()
    layers = adapted_layers(model)
    before = {name: (layer.base.weight.detach().to(dtype, copy=True), layer.layout) for name, layer in layers.items()}
    merge_diablo(model)
    for name, (weight, layout) in before.items():
        _count_changes(report, model.get_submodule(name).weight.detach().to(dtype), weight, layout)
    # transformers' save_pretrained would try to re-apply the quantized loading's conversions: write the
    # dense state dict with the same shard writer as the streaming path instead.
    writer = _ShardWriter(out, shard_limit)
    seen: set[int] = set()
    for key, tensor in model.state_dict().items():
        if tensor.data_ptr() in seen:  # a tied weight is stored once, as transformers does
            continue
        seen.add(tensor.data_ptr())
        writer.add(key, (tensor.to(dtype) if tensor.is_floating_point() else tensor).cpu().contiguous())
    report.tensors, report.shards, report.bytes_written = writer.close()
    _write_config(base_config, out, dtype, untie=not getattr(model.config, "tie_word_embeddings", True))
    del model
    if verify:
        report.verification = compare_with_folder(reference, out, dtype, trust=trust)


def _count_changes(report: MergeReport, merged: torch.Tensor, original: torch.Tensor, layout: BlockLayout) -> None:
    """Tally how many values a merge changed in the output dtype (of the entries the blocks cover): a
    no-op merge cannot go unnoticed."""
    changed = int((merged != original).sum())
    report.adapted_weights += 1
    report.adapted_values += layout.parameters - layout.dead_parameters
    report.changed_values += changed
    report.changed_weights += int(changed > 0)


def parse_shard_size(value: str | int) -> int:
    """``5GB``, ``500MB`` or a byte count, as transformers' ``max_shard_size`` reads it."""
    from transformers.utils.hub import convert_file_size_to_int

    try:
        size = convert_file_size_to_int(value)
    except (ValueError, TypeError):
        size = None
    if not isinstance(size, int) or size <= 0:
        raise DiaBloError(f"--max-shard-size {value!r}: give a size such as 5GB, 500MB or a number of bytes")
    return size


def peak_rss_bytes() -> int:
    """The process's peak resident memory so far (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


# ---------------------------------------------------------------------------------------------------------


def _check_output_dir(output_dir: Path, adapter_dir: Path, *, overwrite: bool) -> None:
    if output_dir.resolve() == adapter_dir.resolve():
        raise DiaBloError(f"--output {output_dir} is the adapter folder itself; choose another folder")
    check_model_output(output_dir, command=MERGE, overwrite=overwrite)


def checkpoint_keys(base_dir: Path) -> tuple[list[Path], set[str]]:
    """The base's safetensors files in order and every tensor key they hold (headers only)."""
    index_path = base_dir / INDEX_FILE
    if index_path.is_file():
        weight_map = read_json_object(index_path, "shard index").get("weight_map") or {}
        shards = [base_dir / name for name in dict.fromkeys(weight_map.values())]
        missing = [p.name for p in shards if not p.is_file()]
        if missing:
            raise DiaBloError(f"{index_path} lists {missing[0]}, which is not in {base_dir}")
        return shards, set(weight_map)
    if (base_dir / SINGLE_FILE).is_file():
        with open_safetensors(base_dir / SINGLE_FILE, DAMAGED_MODEL_ADVICE) as reader:
            return [base_dir / SINGLE_FILE], set(reader.keys())
    pickles = sorted(p.name for p in base_dir.glob("*.bin")) + sorted(p.name for p in base_dir.glob("*.pt*"))
    raise DiaBloError(
        f"{base_dir} has no safetensors weights ({SINGLE_FILE} or {INDEX_FILE})"
        + (f"; it has {pickles[0]}, and diablo-cli never unpickles weights" if pickles else "")
    )


def _output_dtype(requested: str | None, base_dir: Path, config: dict[str, Any], quantized: str | None) -> torch.dtype:
    if requested is not None:
        return getattr(torch, TORCH_DTYPES[requested])
    if not quantized:
        stored = _stored_float_dtype(base_dir)
        if stored is not None:
            return stored
    name = config.get("dtype") or config.get("torch_dtype")
    return getattr(torch, name) if isinstance(name, str) and name in TORCH_DTYPES.values() else torch.float16


def _stored_float_dtype(base_dir: Path) -> torch.dtype | None:
    """The dtype the base's weights are actually stored in (its config can disagree)."""
    shards, _ = checkpoint_keys(base_dir)
    with open_safetensors(shards[0], DAMAGED_MODEL_ADVICE) as reader:
        for key in list(reader.keys()):
            dtype = reader.get_slice(key).get_dtype()
            if dtype in ("F32", "BF16", "F16"):
                return {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}[dtype]
    return None


def _dtype_name(dtype: torch.dtype) -> str:
    """fp32/bf16/fp16: the spelling the --dtype option takes."""
    short = {getattr(torch, name): key for key, name in TORCH_DTYPES.items()}
    return short.get(dtype, str(dtype))


def _write_config(config: dict[str, Any], out: Path, dtype: torch.dtype, *, untie: bool) -> None:
    """The base's config.json as it was, but for the merged model's dtype, no quantization, and no tie
    for an output head that now has its own merged weight."""
    config = dict(config)
    config.pop("torch_dtype", None)
    config.pop("quantization_config", None)
    config["dtype"] = str(dtype).removeprefix("torch.")
    if untie:
        config["tie_word_embeddings"] = False
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def _copy_side_files(base_dir: Path, adapter_dir: Path, out: Path) -> None:
    """The base's small files (generation config, tokenizer, custom code), then the adapter's tokenizer if it
    saved one: a tokenizer is taken whole from one place, never mixed."""
    adapter_has_tokenizer = (adapter_dir / TOKENIZER_CONFIG).is_file()
    for path in sorted(base_dir.iterdir()):
        name = path.name
        if not path.is_file() or name in _NOT_COPIED or (out / name).exists() or not name.endswith(_COPIED_SUFFIXES):
            continue
        if adapter_has_tokenizer and name in TOKENIZER_FILES:
            continue
        shutil.copyfile(path, out / name)
    if adapter_has_tokenizer:
        for name in TOKENIZER_FILES:
            if (adapter_dir / name).is_file():
                shutil.copyfile(adapter_dir / name, out / name)


def _probe_inputs(config) -> dict[str, torch.Tensor]:
    """A fixed batch of token ids spread over the vocabulary (seeded: every run probes the same)."""
    vocab = getattr(config, "vocab_size", None) or 1000
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, PROBE_SHAPE, generator=generator)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if getattr(config, "is_encoder_decoder", False):
        inputs["decoder_input_ids"] = torch.randint(0, vocab, PROBE_SHAPE, generator=generator)
    return {name: tensor.to(compute_device()) for name, tensor in inputs.items()}
