"""What ``diablo convert`` and ``diablo extract`` print: renderings of their records only."""

from __future__ import annotations

from rich.table import Table

from ..records import ConversionReport, ExtractReport
from .tables import cleaned_line


def conversion_summary(report: ConversionReport) -> list[str]:
    """The lines ``diablo convert`` ends with: what was read, how N was found, what was written."""
    lines = [cleaned_line("conversions", report.output, report.cleaned)] if report.cleaned else []
    lines += [f"[dim]{note}[/]" for note in report.notes]
    layers = f", layers {report.layers[0]}–{report.layers[1]}" if report.layers else ""
    targets = report.targets if isinstance(report.targets, str) else f"{len(report.targets)} named layers"
    lines.append(
        f"read {report.source}: {report.modules} layers ({targets}{layers}), {report.parameters:,} parameters in "
        f"{report.dtype}; --num_blocks {report.blocks} (from {report.blocks_from})"
    )
    if report.shrunk:
        by_count: dict[int, list[str]] = {}
        for kind, count in report.shrunk.items():
            by_count.setdefault(count, []).append(kind)
        kinds = "; ".join(f"{count} in {', '.join(kinds)}" for count, kinds in sorted(by_count.items()))
        lines.append(
            f"the official code gives fewer blocks where {report.blocks} does not divide a layer: {kinds} "
            "(kept exactly, as blocks_by_module)"
        )
    if report.trimmed:
        lines.append(
            f"{report.trimmed} layers' last blocks lie wholly in the padding; the official layout leaves them out"
        )
    if report.to == "official":
        lines.append(f"wrote {report.output}; the official scripts take it with {report.official_arguments}")
    else:
        lines.append(f"wrote {report.output} (dropout {report.dropout:g} recorded); use it like any diablo adapter")
    return lines


def extract_table(report: ExtractReport) -> Table:
    """Per module kind: how much of the full fine-tune's update (its Frobenius energy) the diagonal blocks keep."""
    title = f"diagonal blocks of {report.finetuned} − {report.base} (N={report.blocks}, s={report.scale:g})"
    table = Table(title=title)
    for column in ("module", "layers", "N", "energy kept", "least in a layer", "most in a layer"):
        table.add_column(column, justify="left" if column == "module" else "right")
    for kind in report.kinds():
        rows = [m for m in report.modules if m.kind == kind]
        shares = [m.share for m in rows if m.share is not None]
        table.add_row(
            kind,
            str(len(rows)),
            str(rows[0].blocks),
            _percent(report.share_of(rows)),
            _percent(min(shares)) if shares else "—",
            _percent(max(shares)) if shares else "—",
        )
    table.add_section()
    table.add_row("all targeted", str(len(report.modules)), "", _percent(report.share_of(report.modules)), "", "")
    return table


def extract_summary(report: ExtractReport) -> list[str]:
    """The lines under the table: the rest of the update, and what was written."""
    lines = [cleaned_line("extractions", report.output, report.cleaned)] if report.cleaned else []
    if report.budget_source:
        lines.append(f"--budget {report.budget_source}: N={report.blocks}")
    total = report.targeted_energy + report.other_energy
    if total > 0:
        lines.append(
            f"the targeted layers hold {report.targeted_energy / total:.1%} of the whole update's energy; "
            f"{report.other_tensors} other changed tensors (embeddings, norms, untargeted layers) are left out"
        )
    lines.append(
        f"wrote {report.output}: {report.parameters:,} parameters in {len(report.modules)} layers; "
        "score it with diablo eval --adapter, fold it in with diablo merge"
    )
    return lines


def _percent(share: float | None) -> str:
    return "—" if share is None else f"{100 * share:.2f}%"
