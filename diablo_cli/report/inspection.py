"""`diablo inspect`'s views: the model's layers and block-count candidates, scaling, memory, an adapter's
layers, and the Theorem 2 probe."""

from __future__ import annotations

from typing import Any

from rich.table import Table

from ..records import (
    AdapterInspection,
    ModelInspection,
    ProbedModule,
)


def model_inspection_view(inspection: ModelInspection) -> list:
    """``diablo inspect MODEL``: the linear layers, the candidate block counts, and the chosen one."""
    modules = Table(
        title=f"{inspection.model}: {inspection.architecture}, {inspection.base_parameters:,} parameters",
        title_justify="left",
    )
    for column in ("linear layer", "letters", "in × out", "layers", "targeted"):
        modules.add_column(column, justify="right" if column in ("layers",) else "left")
    targeted = {(m.module, m.in_features, m.out_features) for m in inspection.targeted}
    for m in inspection.linear_modules:
        hit = (m.module, m.in_features, m.out_features) in targeted
        modules.add_row(
            m.module, m.letters or "", f"{m.in_features}×{m.out_features}", str(m.layers), "✓" if hit else ""
        )
    candidates = Table(
        title=f"block counts for {inspection.targets}" + (f", layers {inspection.layers}" if inspection.layers else ""),
        title_justify="left",
    )
    for column in ("N", "trainable", "% of model", "blocks (in×out)", "dead (padding)", "LoRA r, same budget"):
        candidates.add_column(column, justify="left" if column.startswith("blocks") else "right")
    for c in inspection.candidates:
        label = str(c.blocks) if isinstance(c.blocks, int) else ", ".join(f"{k}={v}" for k, v in c.blocks.items())
        shapes = ", ".join(dict.fromkeys(f"{d1}×{d2}" for d1, d2 in c.block_shapes.values()))
        candidates.add_row(
            label + ("" if c.divides else " *"),
            f"{c.trainable:,}",
            f"{c.percent_of_base:.3f}%",
            shapes,
            f"{c.dead:,}",
            f"{c.lora_rank:.1f}",
            style="bold green" if c.chosen else None,
        )
    candidates.caption = "* N does not divide every targeted dimension: padding, dead entries counted"
    view: list = [modules, *inspection.notes, candidates]
    if inspection.budget is not None:
        view.append(f"budget: {inspection.budget:,} parameters ({inspection.budget_source}); closest from below:")
        view.append(inspection.recipe_snippet)
    if inspection.lora_snippet is not None:
        view.append(f"the LoRA baseline at this budget (rank {inspection.lora_rank}, closest to N's count):")
        view.append(inspection.lora_snippet)
    if inspection.memory:
        view.append(memory_table(inspection.memory, inspection.memory_settings))
    if inspection.scaling:
        view.append(scaling_table(inspection.scaling, inspection.memory_settings["blocks"]))
    return view


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.3g} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.1f} min"
    if seconds < 3 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def scaling_table(scaling: dict, blocks: Any) -> Table:
    """``diablo inspect --gpus K --sharding S``: one GPU's memory, FLOPs, step and run time (scaling.py)."""
    gib = 2**30
    memory, flops, traffic = scaling["memory"], scaling["flops"], scaling["traffic"]
    gpus = scaling["gpus"]
    table = Table(
        title=(
            f"training on {gpus} GPU{'s' if gpus > 1 else ''} "
            f"({'no sharding' if scaling['sharding'] == 'none' else scaling['sharding']}), first-order estimate: "
            f"DiaBlo N={blocks}, micro batch {scaling['batch']} × {scaling['seq_len']} per GPU, gradient "
            f"checkpointing {'on' if scaling['gradient_checkpointing'] else 'off'}"
        ),
        title_justify="left",
    )
    table.add_column("per GPU")
    table.add_column("", justify="right")
    sharded = scaling["sharding"] in ("zero3", "fsdp")
    rows = [
        ("base weights" + (f" (1/{gpus} shard)" if sharded else ""), f"{memory['weights'] / gib:.2f} GiB"),
    ]
    if sharded:
        rows.append(("one block gathered (working)", f"{memory['gathered_weights'] / gib:.2f} GiB"))
    rows += [
        ("adapter + gradients + AdamW", f"{memory['adapter_and_optimizer'] / gib:.2f} GiB"),
        ("activations (micro batch)", f"{memory['activations'] / gib:.2f} GiB"),
        ("logits", f"{memory['logits'] / gib:.2f} GiB"),
        (
            "total",
            f"{memory['total'] / gib:.2f} GiB "
            + ("✓ fits" if scaling["fits"] else "✗ does not fit")
            + f" in {scaling['gpu_memory_gib']:g} GiB ({scaling['gpu']})",
        ),
        ("training FLOPs per token", f"{flops['total'] / 1e9:.1f} GFLOP"),
        ("tokens per step (all GPUs)", f"{scaling['tokens_per_step']:,}"),
        (
            f"compute per step ({scaling['gpu']}: {scaling['gpu_tflops']:g} TFLOP/s × MFU {scaling['mfu']:g})",
            _duration(scaling["compute_seconds"]),
        ),
    ]
    if scaling["sharding"] != "none":
        rows += [
            ("collective traffic per step", f"{traffic['total'] / gib:.2f} GiB"),
            (f"communication at {scaling['interconnect_gbps']:g} GB/s", _duration(scaling["communication_seconds"])),
        ]
    rows += [
        ("step (compute + communication)", _duration(scaling["step_seconds"])),
        (f"{scaling['tokens']:,} tokens ({scaling['steps']:,} steps)", _duration(scaling["run_seconds"])),
    ]
    for label, value in rows:
        table.add_row(label, value, style="bold" if label in ("total", "step (compute + communication)") else None)
    table.caption = (
        "first-order estimate: MFU is an assumption; no overlap of communication with compute; CUDA context, "
        "fragmentation and NCCL buffers not counted (see diablo_cli/scaling.py)"
    )
    return table


def memory_table(rows: list[dict], settings: dict) -> Table:
    """Training memory by part for DiaBlo and LoRA at the same budget, without and with checkpointing."""
    gib = 2**30
    table = Table(
        title=(
            f"training memory, first-order estimate: N={settings['blocks']} vs LoRA r={settings['lora_rank']}, "
            f"batch {settings['batch']} × {settings['seq_len']} tokens, base {settings['dtype']}"
            + (f" ({settings['dtype_reason']})" if settings.get("dtype_reason", "").startswith("auto") else "")
            + (f" ({settings['quantization']})" if settings["quantization"] != "none" else "")
            + ", fp32 adapters, AdamW"
        ),
        title_justify="left",
    )
    table.add_column("GiB")
    for row in rows:
        table.add_column(row["method"], justify="right")
    parts = [
        ("trainable parameters", "trainable", lambda v: f"{v:,}"),
        ("base weights", "weights", None),
        ("adapter + gradients + AdamW", "adapter_and_optimizer", None),
        ("activations", "activations", None),
        ("adapter's saved inputs", "adapter_inputs", None),
        ("logits", "logits", None),
        ("total", "total", None),
        ("activations, checkpointed", "checkpointed_activations", None),
        ("total, checkpointed", "checkpointed_total", None),
    ]
    for label, key, fmt in parts:
        table.add_row(
            label,
            *[(fmt or (lambda v: f"{v / gib:.2f}"))(row[key]) for row in rows],
            style="bold" if key.endswith("total") else None,
        )
    return table


def adapter_inspection_view(inspection: AdapterInspection, top: int = 10) -> list:
    """``diablo inspect ADAPTER_DIR``: settings, size, and the layers that moved most."""
    config = inspection.config or {}
    header = (
        f"{inspection.path}: DiaBlo adapter for {inspection.base_model}; N={config.get('blocks')}, "
        f"targets {config.get('target_modules')}, {inspection.parameters:,} parameters "
        f"({inspection.adapter_dtype}), {inspection.bytes_on_disk / 1e6:.1f} MB on disk"
    )
    kinds = Table(title="by module: block norms (Frobenius; rms = per entry)", title_justify="left")
    for column in ("module", "layers", "parameters", "mean norm", "max norm"):
        kinds.add_column(column, justify="left" if column == "module" else "right")
    for kind, stats in inspection.by_module.items():
        kinds.add_row(
            kind,
            str(int(stats["layers"])),
            f"{int(stats['parameters']):,}",
            f"{stats['mean_norm']:.3f}",
            f"{stats['max_norm']:.3f}",
        )
    moved = Table(title=f"the {top} layers that moved most (by rms)", title_justify="left")
    for column in ("layer", "N", "norm", "rms"):
        moved.add_column(column, justify="left" if column == "layer" else "right")
    for layer in sorted(inspection.layers, key=lambda item: -item.rms)[:top]:
        moved.add_row(layer.module, str(layer.blocks), f"{layer.norm:.3f}", f"{layer.rms:.2e}")
    return [header, kinds, moved]


def probe_table(rows: list[ProbedModule], data: str) -> Table:
    """``--probe``: effective ranks (95% energy) per module kind and the largest N Theorem 2 allows."""
    table = Table(
        title=f"Theorem 2 on {data}: 95%-energy ranks of inputs (r1) and output gradients (r2), per batch of "
        f"{rows[0].rows if rows else 0} tokens",
        title_justify="left",
    )
    for column in ("module", "m1×m2", "layers", "r1 mean / max", "r2 mean / max", "largest N", "m1·m2/(r1·r2)"):
        table.add_column(column, justify="left" if column == "module" else "right")
    for row in rows:
        table.add_row(
            row.module,
            f"{row.in_features}×{row.out_features}",
            str(row.layers),
            f"{row.r1_mean:.0f} / {row.r1_max}",
            f"{row.r2_mean:.0f} / {row.r2_max}",
            str(row.largest_n) if row.largest_n else "none",
            f"{row.approximate_bound:.0f}",
        )
    table.caption = "largest N: a common factor of m1, m2 with N ≥ ⌈r1·N/m1⌉·⌈r2·N/m2⌉ for the largest ranks seen"
    return table
