"""The README.md a merged model folder carries: the base, the adapter and the block settings, for whoever finds
the folder. Written from the merge's record alone."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ._version import __version__
from .records import MergeReport

MODEL_CARD = "README.md"


def write_model_card(out: Path, report: MergeReport, adapter_dir: Path, document: dict[str, Any]) -> None:
    """A short README.md naming the base, the adapter and the block settings, for whoever finds the folder."""
    config = document.get("config") or {}
    check = report.verification
    peft = "peft_type" in document  # a `type: lora | dora` run
    kind = ("DoRA" if document.get("use_dora") else document["peft_type"]) if peft else "DiaBlo"
    lines = [
        "---",
        "library_name: transformers",
        "tags: [diablo, merged]",
        f"base_model: {report.base}",
        "---",
        "",
        f"# {report.output_dir.name}",
        "",
        f"{report.base} with a {kind} adapter merged into its weights by diablo-cli {__version__}: an ordinary",
        "transformers model, no diablo-cli needed to load it.",
        "",
        f"- base model: `{report.base}`",
    ]
    if peft:
        lines += [
            f"- adapter: `{adapter_dir}` (PEFT {kind}, r={document.get('r')}, alpha={document.get('lora_alpha')})",
            f"- {len(document.get('target_modules') or [])} adapted layers; merged in fp32 by PEFT, saved as "
            f"{report.dtype}",
        ]
    else:
        lines += [
            f"- adapter: `{adapter_dir}` (id `{document.get('adapter_id')}`, {document.get('parameters', 0):,} "
            "parameters)",
            f"- blocks: N={config.get('blocks')}, target modules `{config.get('target_modules')}`"
            + (f", per module {config['blocks_by_module']}" if config.get("blocks_by_module") else "")
            + (f", layers {config['layers']}" if config.get("layers") else ""),
            f"- {len(document.get('modules', {}))} adapted layers; merged in fp32 and saved as {report.dtype}",
        ]
    if report.dequantized:
        lines.append(
            f"- the quantized base was dequantized first ({report.dequantized}): this is a full-precision model"
        )
    if check is not None:
        lines.append(
            f"- verified: max |logit difference| to base+adapter {check.max_abs:.3g} "
            f"(relative {check.max_relative:.1e}) on {check.tokens} probe tokens"
        )
    (out / MODEL_CARD).write_text("\n".join(lines) + "\n", encoding="utf-8")
