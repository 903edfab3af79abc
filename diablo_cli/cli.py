"""The ``diablo`` command: a thin Typer skin over the library's plain functions.

Subcommands (train, eval, merge, quantize, inspect) arrive in their own issues. Whatever they raise as a
DiaBloError is printed as one line and exits with status 2, never as a traceback.
"""

from __future__ import annotations

import sys
from pathlib import Path

import typer
from rich.console import Console

from ._version import __version__
from .errors import DiaBloError, TrainingStopped

app = typer.Typer(
    name="diablo",
    help="Fine-tune large language models with DiaBlo: trainable diagonal blocks instead of low-rank adapters.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
error_console = Console(stderr=True)

EXIT_USER_ERROR = 2


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"diablo-cli {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: bool = typer.Option(
        False, "--version", help="Print the version and exit.", callback=_print_version, is_eager=True
    ),
) -> None:
    """Fine-tune large language models with DiaBlo."""


@app.command()
def train(
    recipe: Path = typer.Argument(..., help="The recipe YAML (see configs/)."),
    output_dir: Path | None = typer.Option(None, "--output-dir", "-o", help="Overrides output.dir."),
    set_values: list[str] = typer.Option([], "--set", help="Override a recipe key: --set training.learning_rate=1e-4"),
    resume: str | None = typer.Option(
        None,
        "--resume",
        help="Continue from the newest checkpoint in the output dir (bare --resume), or from the folder given.",
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a previous run in the output dir."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Show the resolved recipe, budget and data; train nothing."),
) -> None:
    """Fine-tune a base model with DiaBlo as a recipe says; the adapter goes to the output dir."""
    from .recipe import load_recipe
    from .train import dry_run as show_dry_run
    from .train import train as run_training

    overrides = list(set_values)
    if output_dir is not None:
        overrides.append(f"output.dir={output_dir}")
    if overwrite:
        overrides.append("output.overwrite=true")
    loaded = load_recipe(recipe, overrides)
    if dry_run:
        show_dry_run(loaded)
        return
    run_training(loaded, resume=resume)


@app.command()
def merge(
    adapter: Path = typer.Option(..., "--adapter", "-a", help="The adapter folder (a train run's output dir)."),
    base: str | None = typer.Option(
        None, "--base", help="Base model: hub id, local folder or alias. Default: the base the adapter records."
    ),
    output: Path | None = typer.Option(
        None, "--output", "-o", help="Where to write the model. Default: ADAPTER-merged."
    ),
    dtype: str | None = typer.Option(None, "--dtype", help="fp32, bf16 or fp16. Default: the base's own dtype."),
    max_shard_size: str = typer.Option("5GB", "--max-shard-size", help="Largest safetensors shard, e.g. 5GB, 500MB."),
    verify: bool = typer.Option(
        True, "--verify/--no-verify", help="Check the merged logits against base+adapter before writing."
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a model already in the output folder."),
    revision: str | None = typer.Option(None, "--revision", help="Hub revision of the base."),
) -> None:
    """Fold an adapter into its base: a standalone Hugging Face model, verified, written shard by shard."""
    from rich.console import Console

    from .merge import merge_adapter
    from .report import merge_summary, quiet_transformers, task_progress

    console = Console()
    with quiet_transformers(), task_progress(console, "merging") as advance:
        report = merge_adapter(
            adapter,
            output,
            base=base,
            dtype=dtype,
            max_shard_size=max_shard_size,
            verify=verify,
            overwrite=overwrite,
            revision=revision,
            progress=advance,
        )
    for line in merge_summary(report):
        console.print(line, highlight=False)


@app.command()
def inspect(
    target: str = typer.Argument(
        ..., help="A model (hub id, local folder, alias), an adapter folder, or a recipe YAML."
    ),
    targets: str = typer.Option("QKVUD", "--targets", help="Letters (QKVOGUD), all-linear, names (a,b) or a regex."),
    layers: str | None = typer.Option(None, "--layers", help="Inclusive block range, e.g. 0-15."),
    blocks: str | None = typer.Option(None, "--blocks", help="Extra block counts to show, e.g. 48,96."),
    budget: str | None = typer.Option(None, "--budget", help="Pick N for a budget: 1% of the model, or 70M, 500k."),
    match_lora: int | None = typer.Option(None, "--match-lora", help="Pick N for LoRA rank R's budget."),
    per_module: bool = typer.Option(False, "--per-module", help="With a budget: one N per module kind."),
    seq_len: int = typer.Option(512, "--seq-len", help="Memory estimate: tokens per sequence."),
    batch: int = typer.Option(1, "--batch", help="Memory estimate: sequences per micro batch."),
    dtype: str | None = typer.Option(None, "--dtype", help="Memory estimate: base dtype (fp32, bf16, fp16)."),
    quantization: str = typer.Option(
        "none", "--quantization", help="Memory estimate: none, bnb-4bit, bnb-8bit, gptq-4bit, gptq-8bit."
    ),
    probe: str | None = typer.Option(
        None, "--probe", help="A dataset (file or preset): measure ranks for Theorem 2 (loads the weights)."
    ),
    probe_batches: int = typer.Option(2, "--probe-batches", help="How many batches --probe runs."),
    as_json: bool = typer.Option(False, "--json", help="Print machine-readable JSON instead of tables."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Allow a model's custom code."),
) -> None:
    """Choose N against a parameter budget, and see what a model, adapter or recipe holds (no weights loaded)."""
    import json
    from dataclasses import asdict

    from rich.console import Console

    from . import inspection as insp
    from .report import adapter_inspection_view, model_inspection_view, probe_table, quiet_transformers

    console = Console()
    path = Path(target)
    if path.suffix in (".yaml", ".yml"):
        from .recipe import load_recipe
        from .train import show_plan

        recipe = load_recipe(path)
        if as_json:
            typer.echo(json.dumps(recipe.model_dump(mode="json"), indent=2))
        else:
            show_plan(recipe, console)
        return
    if path.is_dir() and (path / "adapter_config.json").is_file():
        result = insp.inspect_adapter(path)
        view = adapter_inspection_view(result)
    else:
        selection = {"targets": insp.parse_targets(targets), "layers": insp.parse_layers(layers)}
        result = insp.inspect_model(
            target,
            **selection,
            blocks=insp.parse_block_list(blocks),
            budget=budget,
            match_lora=match_lora,
            per_module=per_module,
            seq_len=seq_len,
            batch=batch,
            dtype=dtype,
            quantization=quantization,
            trust_remote_code=trust_remote_code,
        )
        view = model_inspection_view(result)
        if probe is not None:
            with quiet_transformers(), console.status(f"probing {target} on {probe} ({probe_batches} batches)"):
                probed = insp.probe_theorem2(
                    target,
                    probe,
                    **selection,
                    batches=probe_batches,
                    batch=batch,
                    seq_len=seq_len,
                    trust_remote_code=trust_remote_code,
                )
            result.probe = [asdict(p) for p in probed]
            view.append(probe_table(probed, probe))
    if as_json:
        typer.echo(json.dumps(result.to_dict(), indent=2))
        return
    for item in view:
        console.print(item)


def bare_resume_means_latest(argv: list[str]) -> list[str]:
    """``--resume`` may come without a value (the newest checkpoint); Typer's options cannot express an
    optional value, so a bare one gets ``latest`` here: when nothing follows it, an option does, or the
    recipe file does."""
    out: list[str] = []
    for index, arg in enumerate(argv):
        out.append(arg)
        if arg == "--resume":
            following = argv[index + 1] if index + 1 < len(argv) else None
            if following is None or following.startswith("-") or following.endswith((".yaml", ".yml")):
                out.append("latest")
    return out


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: run the app, turning user errors into one clear line."""
    argv = bare_resume_means_latest(list(sys.argv[1:] if argv is None else argv))
    try:
        app(args=argv, prog_name="diablo", standalone_mode=True)
    except TrainingStopped as err:
        error_console.print(f"[bold yellow]stopped:[/] {err}", highlight=False, soft_wrap=True)
        sys.exit(err.exit_code)
    except DiaBloError as err:
        error_console.print(f"[bold red]error:[/] {err}", highlight=False, soft_wrap=True)
        sys.exit(EXIT_USER_ERROR)
