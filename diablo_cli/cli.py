"""The ``diablo`` command: a thin Typer skin over the library's plain functions.

Subcommands: train, eval, merge, quantize, inspect, convert, extract. Whatever they raise as a
DiaBloError is printed as one line and exits with status 2, never as a traceback. Ctrl-C and SIGTERM end
every command the same way: one line saying what was kept and what was removed, exit 130 / 143. Third-party
output goes to a log file while a command runs (quiet.py), so the terminal holds diablo's own lines.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import typer
from rich.console import Console

from ._version import __version__
from .errors import DiaBloError, TrainingStopped
from .interrupts import Interrupted, interrupts_raised, signals_held
from .quiet import command_output

app = typer.Typer(
    name="diablo",
    help="Fine-tune large language models with DiaBlo: trainable diagonal blocks instead of low-rank adapters.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
error_console = Console(stderr=True)

EXIT_USER_ERROR = 2


@dataclass
class Session:
    """The global options, set by ``root`` before each command runs."""

    verbose: bool = False


session = Session()


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"diablo-cli {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: bool = typer.Option(
        False, "--version", help="Print the version and exit.", callback=_print_version, is_eager=True
    ),
    verbose: bool = typer.Option(
        False,
        "--verbose",
        help="Show third-party warnings, log lines and progress bars. By default they go to diablo.log in the "
        "output folder (train, merge, quantize), else under ~/.cache/diablo-cli/logs/.",
    ),
) -> None:
    """Fine-tune large language models with DiaBlo."""
    session.verbose = verbose


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
    launcher: str = typer.Option(
        "none", "--launcher", help="accelerate: run under `accelerate launch` (data-parallel, FSDP, DeepSpeed)."
    ),
    num_processes: int | None = typer.Option(
        None, "--num-processes", help="With --launcher accelerate: how many processes (GPUs, or CPU processes)."
    ),
    accelerate_config: Path | None = typer.Option(
        None,
        "--accelerate-config",
        help="With --launcher accelerate: an accelerate config file, or ddp | fsdp | fsdp2 | zero2 | zero3 "
        "(configs/accelerate/).",
    ),
) -> None:
    """Fine-tune a base model with DiaBlo as a recipe says; the adapter goes to the output dir."""
    from .launch import LAUNCHERS, accelerate_config_path, launch_with_accelerate

    if launcher not in LAUNCHERS:
        raise DiaBloError(f"--launcher {launcher!r}: one of {', '.join(LAUNCHERS)}")
    if launcher == "none" and (num_processes is not None or accelerate_config is not None):
        raise DiaBloError("--num-processes and --accelerate-config need --launcher accelerate")
    overrides = list(set_values)
    if output_dir is not None:
        overrides.append(f"output.dir={output_dir}")
    if overwrite:
        overrides.append("output.overwrite=true")
    if launcher == "accelerate" and not dry_run:  # not quiet here: each process runs `train` and keeps its own log
        from .recipe import load_recipe

        _check_base(load_recipe(recipe, overrides))  # checked here, before any process starts
        arguments = [str(recipe), *(f"--set={value}" for value in overrides)]
        arguments += ["--resume", resume] if resume is not None else []
        config_file = accelerate_config_path(accelerate_config) if accelerate_config is not None else None
        code = launch_with_accelerate(arguments, num_processes=num_processes, config_file=config_file)
        raise typer.Exit(code)
    with command_output("train", verbose=session.verbose) as output:
        from .recipe import load_recipe
        from .training import dry_run as show_dry_run
        from .training import train as run_training

        loaded = load_recipe(recipe, overrides)
        _check_base(loaded)
        console = Console(file=output.out)
        if dry_run:
            show_dry_run(loaded, console=console)
            return
        run_dir = Path(loaded.output.dir)
        with _on_interrupt(_train_outcome(run_dir)):
            try:
                run_training(loaded, resume=resume, console=console)
            except TrainingStopped:  # it stopped with a checkpoint: the run folder is this run's
                output.keep_log_in(run_dir)
                raise
            output.keep_log_in(run_dir)


def _check_base(loaded) -> None:
    """A base's folder read before a run folder is claimed: a damaged or custom-code base fails with nothing made."""
    from .models import check_local_model, resolve_model

    check_local_model(
        resolve_model(loaded.base_model), loaded.base_model, trust_remote_code=loaded.model.trust_remote_code
    )


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
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Run the base's own modelling code."),
) -> None:
    """Fold an adapter into its base: a standalone Hugging Face model, verified, written shard by shard."""
    with command_output("merge", verbose=session.verbose) as log:
        from .merge import default_output_dir, merge_adapter
        from .report import merge_summary, task_progress

        output = output or default_output_dir(adapter)
        console = Console(file=log.out)
        with _on_interrupt(_staged_output("merge", output)):
            with task_progress(console, "merging") as advance:
                report = merge_adapter(
                    adapter,
                    output,
                    base=base,
                    dtype=dtype,
                    max_shard_size=max_shard_size,
                    verify=verify,
                    overwrite=overwrite,
                    revision=revision,
                    trust_remote_code=trust_remote_code,
                    progress=advance,
                )
            log.keep_log_in(output)
            for line in merge_summary(report):
                console.print(line, highlight=False)


@app.command()
def convert(
    source: Path = typer.Argument(..., help="An official run folder or adapter.chkpt (--to official: an adapter)."),
    output: Path = typer.Option(..., "--output", "-o", help="The adapter folder to write (--to official: the .chkpt)."),
    base: str | None = typer.Option(None, "--base", help="The base the run trained (hub id, folder or alias)."),
    blocks: int | None = typer.Option(None, "--blocks", min=1, help="The run's --num_blocks (default: inferred)."),
    to: str = typer.Option("diablo", "--to", help="diablo (default): official → adapter folder; official: back."),
    dropout: float = typer.Option(0.05, "--dropout", help="The run's --dropout, recorded (the official default 0.05)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an adapter diablo convert wrote before."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Read the base's own config code."),
) -> None:
    """Bring an adapter trained with the official DiaBlo code (ziyangjoy/DiaBlo) in, or hand one back to it."""
    with command_output("convert", verbose=session.verbose) as log, _on_interrupt(_staged_output("convert", output)):
        from .convert import convert_from_official, convert_to_official
        from .report import conversion_summary

        if to not in ("diablo", "official"):
            raise DiaBloError(f"--to {to!r}: diablo (an official checkpoint in) or official (an adapter out)")
        if to == "official":
            report = convert_to_official(source, output)
        elif base is None:
            raise DiaBloError("--base: an official adapter.chkpt does not record its base; name the model it trained")
        else:
            report = convert_from_official(
                source,
                output,
                base=base,
                blocks=blocks,
                dropout=dropout,
                overwrite=overwrite,
                trust_remote_code=trust_remote_code,
            )
        console = Console(file=log.out)
        for line in conversion_summary(report):
            console.print(line, highlight=False)


@app.command()
def extract(
    base: str = typer.Option(..., "--base", help="The model the fine-tune started from (folder, hub id or alias)."),
    finetuned: str = typer.Option(..., "--finetuned", help="The fully fine-tuned model (safetensors folder)."),
    output: Path = typer.Option(..., "--output", "-o", help="The adapter folder to write."),
    blocks: int | None = typer.Option(None, "--blocks", min=1, help="N diagonal blocks per layer (default 64)."),
    budget: str | None = typer.Option(None, "--budget", help="Pick N for a budget, as inspect does: 1%, 70M."),
    targets: str = typer.Option("QKVUD", "--targets", help="Letters (QKVOGUD), all-linear, names (a,b) or a regex."),
    layers: str | None = typer.Option(None, "--layers", help="Inclusive block range, e.g. 0-15."),
    scale: float = typer.Option(1.0, "--scale", help="s: the blocks keep s·(W_ft − W_pre) (paper A.4.8: 0.7–0.75)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an adapter diablo extract wrote before."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Read the models' own config code."),
) -> None:
    """Keep the diagonal blocks of a full fine-tune's update as a DiaBlo adapter; report the energy they keep."""
    with command_output("extract", verbose=session.verbose) as log, _on_interrupt(_staged_output("extract", output)):
        from .extract import extract_adapter
        from .inspection import parse_layers, parse_targets
        from .report import extract_summary, extract_table, task_progress

        console = Console(file=log.out)
        with task_progress(console, "extracting") as advance:
            report = extract_adapter(
                base,
                finetuned,
                output,
                blocks=blocks,
                budget=budget,
                targets=parse_targets(targets),
                layers=parse_layers(layers),
                scale=scale,
                overwrite=overwrite,
                trust_remote_code=trust_remote_code,
                progress=advance,
            )
        log.keep_log_in(output)
        console.print(extract_table(report))
        for line in extract_summary(report):
            console.print(line, highlight=False)


@app.command("eval")
def eval_command(
    recipe: Path | None = typer.Argument(None, help="A recipe whose `eval:` section names the tasks (optional)."),
    base: str | None = typer.Option(None, "--base", help="Base model. Default: the recipe's, else the adapter's."),
    adapters: list[Path] = typer.Option([], "--adapter", "-a", help="An adapter folder; repeat to compare several."),
    models: list[str] = typer.Option([], "--model", help="A standalone model (e.g. a merged folder) as another row."),
    tasks: list[str] = typer.Option([], "--task", "-t", help="A task (repeatable); `--list-tasks` shows them."),
    data: str | None = typer.Option(None, "--data", help="Local copy of the task's data, in its published format."),
    limit: int | None = typer.Option(None, "--limit", min=1, help="Evaluate the first N examples of each task."),
    batch_size: int | None = typer.Option(None, "--batch-size", min=1, help="Prompts per batch (default 16)."),
    json_path: Path | None = typer.Option(None, "--json", help="Write scores here; predictions go beside it."),
    seed: int | None = typer.Option(None, "--seed", help="Seed for sampled decoding (default 0)."),
    template: str | None = typer.Option(None, "--template", help="alpaca, chat or plain. Default: as trained."),
    dtype: str | None = typer.Option(
        None, "--dtype", help="auto, fp32, bf16 or fp16. Default: as trained (auto: bf16 where native, else fp32)."
    ),
    scoring: str | None = typer.Option(None, "--scoring", help="generate (default) or loglik (multiple choice)."),
    max_new_tokens: int | None = typer.Option(None, "--max-new-tokens", min=1, help="Default: the task's."),
    stop: list[str] = typer.Option([], "--stop", help="Also stop generating at this text (repeatable)."),
    temperature: float = typer.Option(0.0, "--temperature", min=0.0, help="0 = greedy (default)."),
    top_p: float = typer.Option(1.0, "--top-p", help="Nucleus sampling (with --temperature)."),
    num_samples: int = typer.Option(1, "--num-samples", min=1, help="Samples per prompt (humaneval pass@k)."),
    no_base: bool = typer.Option(False, "--no-base", help="Leave out the base model's row."),
    allow_code_execution: bool = typer.Option(
        False, "--allow-code-execution", help="Run generated code (humaneval) in the sandboxed subprocess."
    ),
    code_timeout: float = typer.Option(10.0, "--code-timeout", help="Seconds per generated program."),
    refusal_classifier: str | None = typer.Option(
        None, "--refusal-classifier", help="hexphi: `keywords` (default) or package.module:function."
    ),
    harness: str | None = typer.Option(None, "--harness", help="lm-evaluation-harness tasks, comma-separated."),
    harness_include: str | None = typer.Option(None, "--harness-include", help="Folder of custom harness tasks."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Run the model repo's own code."),
    list_tasks: bool = typer.Option(False, "--list-tasks", help="List the built-in tasks and exit."),
) -> None:
    """Score the base, each adapter and each merged model on the paper's benchmarks, side by side."""
    if list_tasks:
        from .evaluate.tasks import TASKS

        console = Console()
        for task in TASKS.values():
            console.print(f"[bold]{task.name:<12}[/] {task.family:<12} {task.about}", highlight=False)
        console.print(f"[bold]{'loss':<12}[/] {'loss':<12} mean loss and perplexity on --data (any training format)")
        return
    with command_output("eval", verbose=session.verbose) as log:
        from .evaluate.compare import build_plan, run_evaluation
        from .evaluate.generation import Sampling
        from .evaluate.runner import EvalSettings, predictions_path, write_results
        from .recipe import load_recipe
        from .report import eval_table, row_progress

        if template is not None and template not in ("alpaca", "chat", "plain"):
            raise DiaBloError(f"--template {template!r}: valid templates are alpaca, chat, plain")
        if scoring is not None and scoring not in ("generate", "loglik"):
            raise DiaBloError(f"--scoring {scoring!r}: valid values are generate, loglik")
        loaded = load_recipe(recipe) if recipe is not None else None
        section = loaded.eval if loaded is not None else None
        settings = EvalSettings(
            batch_size=batch_size or (section.batch_size if section else 16),
            limit=limit,
            seed=seed if seed is not None else (section.seed if section else 0),
            dtype=dtype,
            allow_code_execution=allow_code_execution,
            code_timeout=code_timeout,
            refusal_classifier=refusal_classifier,
            trust_remote_code=trust_remote_code or bool(loaded and loaded.model.trust_remote_code),
            harness=[name.strip() for name in (harness or "").split(",") if name.strip()],
            harness_include=harness_include,
        )
        plan = build_plan(
            recipe=loaded,
            base=base,
            adapters=adapters,
            models=models,
            task_names=tasks,
            data=data,
            include_base=not no_base,
            template=template,
            scoring=scoring,
            max_new_tokens=max_new_tokens,
            stop=stop,
            sampling=Sampling(temperature, top_p, num_samples, settings.seed),
            settings=settings,
        )
        results = [json_path, predictions_path(json_path)] if json_path is not None else []
        with _on_interrupt(_eval_outcome(results)):
            console = Console(file=log.out)
            for note in plan.notes:
                console.print(f"[dim]{note}[/]", highlight=False)
            if any(spec.family == "code" for spec in plan.tasks) and allow_code_execution:
                console.print(
                    "[yellow]--allow-code-execution: generated programs run in a sandboxed subprocess (time and "
                    "memory limits, no network, a temporary folder)[/]"
                )
            with row_progress(console) as progress:
                result = run_evaluation(
                    plan, progress=progress, log=lambda m: console.print(f"[dim]{m}[/]", highlight=False)
                )
            console.print(eval_table(result.scores, result.templates))
            if json_path is not None:
                with signals_held():  # the scores and their predictions, both or neither
                    scores_file, predictions_file = write_results(result, json_path)
                console.print(f"scores: {scores_file}; predictions: {predictions_file}", highlight=False)


@app.command()
def quantize(
    base: str = typer.Option(..., "--base", "-b", help="Full-precision base: hub id, local folder or alias."),
    output: Path = typer.Option(..., "--output", "-o", help="Where to write the quantized model."),
    method: str = typer.Option("gptq", "--method", "-m", help="gptq, rtn (round-to-nearest) or bnb-4bit."),
    bits: int = typer.Option(4, "--bits", help="2, 3, 4 or 8 (gptq, rtn); bnb-4bit is 4."),
    group_size: int = typer.Option(128, "--group-size", help="Weights sharing one scale (gptq, rtn); -1: per channel."),
    desc_act: bool = typer.Option(False, "--desc-act", help="GPTQ: quantize columns in order of activation size."),
    sym: bool = typer.Option(True, "--sym/--asym", help="Symmetric (default) or asymmetric quantization grid."),
    damp: float = typer.Option(0.05, "--damp", help="GPTQ: dampening added to the Hessian's diagonal (fraction)."),
    magr: bool = typer.Option(False, "--magr", help="MagR first: shrink each channel's largest weights, same outputs."),
    magr_alpha: float | None = typer.Option(
        None, "--magr-alpha", help="MagR's ℓ∞ weight. Default 1e-3 per channel, 1e-4 per group (the MagR paper)."
    ),
    magr_iterations: int = typer.Option(200, "--magr-iterations", help="MagR proximal-gradient steps per layer."),
    calibration: str = typer.Option(
        "python-docs",
        "--calibration",
        help="Calibration text: python-docs (ships with Python), a dataset preset, hub id, or local .jsonl/.csv/.txt.",
    ),
    samples: int = typer.Option(128, "--samples", help="Calibration windows."),
    seq_len: int = typer.Option(2048, "--seq-len", help="Tokens per calibration window."),
    seed: int = typer.Option(0, "--seed", help="Seed for the calibration windows' offsets."),
    evaluate: bool = typer.Option(False, "--eval", help="Perplexity on held-out text before and after."),
    bnb_quant_type: str = typer.Option("nf4", "--bnb-quant-type", help="bnb-4bit: nf4 or fp4."),
    bnb_double_quant: bool = typer.Option(
        True, "--bnb-double-quant/--no-bnb-double-quant", help="bnb-4bit: quantize the scales too."
    ),
    bnb_compute_dtype: str = typer.Option("bf16", "--bnb-compute-dtype", help="bnb-4bit: fp32, bf16 or fp16."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a model already in the output folder."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Run the base's own modelling code."),
    revision: str | None = typer.Option(None, "--revision", help="Hub revision of the base."),
) -> None:
    """Quantize a base to fine-tune on: GPTQ (GPTQModel), round-to-nearest or bitsandbytes 4-bit, optionally
    after MagR; reports size, per-layer error and perplexity."""
    with command_output("quantize", verbose=session.verbose) as log, _on_interrupt(_staged_output("quantize", output)):
        from .quantize.pipeline import quantize_model
        from .report import quantize_summary, task_progress

        console = Console(file=log.out)
        with task_progress(console, "quantizing") as advance:
            report = quantize_model(
                base,
                output,
                method=method,
                bits=bits,
                group_size=group_size,
                desc_act=desc_act,
                sym=sym,
                damp_percent=damp,
                magr=magr,
                magr_alpha=magr_alpha,
                magr_iterations=magr_iterations,
                calibration=calibration,
                samples=samples,
                seq_len=seq_len,
                seed=seed,
                evaluate=evaluate,
                bnb_quant_type=bnb_quant_type,
                bnb_double_quant=bnb_double_quant,
                bnb_compute_dtype=bnb_compute_dtype,
                overwrite=overwrite,
                trust_remote_code=trust_remote_code,
                revision=revision,
                progress=advance,
            )
        log.keep_log_in(output)
        for item in quantize_summary(report):
            console.print(item, highlight=False)


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
    dtype: str | None = typer.Option(
        None, "--dtype", help="Memory estimate: base dtype (auto, fp32, bf16, fp16). Default: auto, as train picks."
    ),
    quantization: str = typer.Option(
        "none", "--quantization", help="Memory estimate: none, bnb-4bit, bnb-8bit, gptq-4bit, gptq-8bit."
    ),
    gradient_checkpointing: bool = typer.Option(
        False, "--gradient-checkpointing", help="Scaling estimate: checkpoint layers (less memory, +1 forward)."
    ),
    gpus: int = typer.Option(1, "--gpus", help="Scaling estimate: data-parallel GPUs."),
    sharding: str | None = typer.Option(
        None, "--sharding", help="Scaling estimate: none, ddp, zero2, zero3 or fsdp. Default: none on 1 GPU, else ddp."
    ),
    gpu: str | None = typer.Option(
        None,
        "--gpu",
        help="Scaling estimate: the GPU (a100-40gb, a100-80gb, h100, h100-pcie, h200, l40s, l4, a10). "
        "Default a100-80gb.",
    ),
    gpu_tflops: float | None = typer.Option(
        None, "--gpu-tflops", help="Scaling estimate: peak TFLOP/s per GPU. Default: --gpu's bf16 dense peak."
    ),
    mfu: float | None = typer.Option(
        None, "--mfu", help="Scaling estimate: assumed model FLOPs utilisation, 0-1. Default 0.4 (an assumption)."
    ),
    interconnect_gbps: float | None = typer.Option(
        None,
        "--interconnect-gbps",
        help="Scaling estimate: GB/s (gigabytes) per GPU. Default: --gpu's node link up to 8 GPUs (A100 NVLink: 300), "
        "its network beyond (A100: 25).",
    ),
    gpu_memory: float | None = typer.Option(
        None, "--gpu-memory", help="Scaling estimate: GiB per GPU, to say what fits. Default: --gpu's memory."
    ),
    tokens: str = typer.Option("100M", "--tokens", help="Scaling estimate: tokens in the whole run, e.g. 100M, 1B."),
    probe: str | None = typer.Option(
        None, "--probe", help="A dataset (file or preset): measure ranks for Theorem 2 (loads the weights)."
    ),
    probe_batches: int = typer.Option(2, "--probe-batches", help="How many batches --probe runs."),
    as_json: bool = typer.Option(False, "--json", help="Print machine-readable JSON instead of tables."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Allow a model's custom code."),
) -> None:
    """Choose N against a parameter budget, and see what a model, adapter or recipe holds (no weights loaded)."""
    with command_output("inspect", verbose=session.verbose) as log:
        import json
        from dataclasses import asdict

        from . import inspection as insp
        from .report import adapter_inspection_view, model_inspection_view, probe_table, spinner
        from .run_folder import ADAPTER_CONFIG
        from .scaling import parse_tokens

        console = Console(file=log.out)
        path = Path(target)
        if path.suffix in (".yaml", ".yml"):
            from .recipe import load_recipe
            from .training import show_plan

            recipe = load_recipe(path)
            if as_json:
                typer.echo(json.dumps(recipe.model_dump(mode="json"), indent=2), file=log.out)
            else:
                show_plan(recipe, console)
            return
        if path.is_dir() and (path / ADAPTER_CONFIG).is_file():
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
                gradient_checkpointing=gradient_checkpointing,
                gpus=gpus,
                sharding=sharding,
                gpu=gpu,
                gpu_tflops=gpu_tflops,
                mfu=mfu,
                interconnect_gbps=interconnect_gbps,
                gpu_memory_gib=gpu_memory,
                tokens=parse_tokens(tokens),
                trust_remote_code=trust_remote_code,
            )
            view = model_inspection_view(result)
            if probe is not None:
                probing = _on_interrupt(lambda: f"inspect stopped while probing {target}; it writes nothing")
                with probing, spinner(console, f"probing {target} on {probe} ({probe_batches} batches)"):
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
            typer.echo(json.dumps(result.to_dict(), indent=2), file=log.out)
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
    """Console-script entry point: run the app, turning user errors and interrupts into one clear line."""
    with interrupts_raised():
        argv = bare_resume_means_latest(list(sys.argv[1:] if argv is None else argv))
        try:
            app(args=argv, prog_name="diablo", standalone_mode=True)
        except TrainingStopped as err:
            error_console.print(f"[bold yellow]stopped:[/] {err}", highlight=False, soft_wrap=True)
            sys.exit(err.exit_code)
        except DiaBloError as err:
            error_console.print(f"[bold red]error:[/] {err}", highlight=False, soft_wrap=True)
            sys.exit(EXIT_USER_ERROR)
        except Interrupted as stop:
            outcome = stop.outcome or "diablo stopped before writing anything"
            error_console.print(f"[bold yellow]interrupted:[/] {outcome}", highlight=False, soft_wrap=True)
            sys.exit(stop.exit_code)


@contextmanager
def _on_interrupt(outcome: Callable[[], str]) -> Iterator[None]:
    """Fill in an interrupted command's line with what it kept and what it removed, worked out after the
    command's own ``finally`` blocks ran (the innermost such block has the last word)."""
    try:
        yield
    except Interrupted as stop:
        if stop.outcome is None:
            stop.outcome = outcome()
        raise


def _staged_output(command: str, output: Path) -> Callable[[], str]:
    """merge and quantize build their model in hidden folders beside ``output`` (``.NAME-merging-…``) and swap it
    in with two renames, so after an interrupt ``output`` is the new model or as it was."""
    before = _identity(output)
    hidden = _hidden_siblings(output)

    def outcome() -> str:
        if _identity(output) != before:
            return f"{command} had finished: {output} holds the new model"
        left = sorted(_hidden_siblings(output) - hidden)
        kept = f"nothing written to {output}" + ("; the model already there is untouched" if before else "")
        cleaned = f"could not remove {', '.join(left)}" if left else "no staging folder left behind"
        return f"{command} stopped; {kept} ({cleaned})"

    return outcome


def _eval_outcome(results: list[Path]) -> Callable[[], str]:
    """eval writes only at its end, the scores and their predictions together (``--json``)."""
    before = [_identity(path) for path in results]

    def outcome() -> str:
        written = [str(path) for path, was in zip(results, before, strict=True) if _identity(path) != was]
        if written:
            return f"eval stopped after writing {' and '.join(written)}"
        previous = [str(path) for path, was in zip(results, before, strict=True) if was is not None]
        return "eval stopped; no scores were written" + (f" ({', '.join(previous)} as before)" if previous else "")

    return outcome


def _train_outcome(run_dir: Path) -> Callable[[], str]:
    """A signal in train's start-up or final saves (the loop itself checkpoints and stops: train.py). By the time
    this speaks, ``RunFolder.discard`` has removed what a run without a checkpoint wrote (the folder too, if the
    run made it); a folder with checkpoints is kept for --resume."""
    from .run_folder import list_checkpoints

    existed = run_dir.exists()

    def outcome() -> str:
        found = list_checkpoints(run_dir)
        if found:
            return f"train stopped; {run_dir} keeps {found[-1]}; continue with --resume"
        if not run_dir.exists():
            return f"train stopped before its first checkpoint; nothing was left in {run_dir}"
        if existed:
            return f"train stopped before its first checkpoint; removed what it wrote in {run_dir}, kept the rest"
        return f"train stopped before its first checkpoint; {run_dir} keeps what it wrote there"

    return outcome


def _identity(path: Path) -> tuple[int, int, int] | None:
    """Inode, modification time and size: a rename into place or any rewrite changes it."""
    try:
        status = path.stat()
    except OSError:
        return None
    return status.st_ino, status.st_mtime_ns, status.st_size


def _hidden_siblings(output: Path) -> set[str]:
    prefix = f".{output.name}-"
    parent = output.parent
    return {item.name for item in parent.iterdir() if item.name.startswith(prefix)} if parent.is_dir() else set()
