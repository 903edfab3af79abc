"""`diablo eval`: several models (base, base + each adapter, merged folders) on several tasks, side by side.

The base is loaded once; each adapter is attached to it, evaluated and taken off again, so N adapters cost one
load. Standalone models (merged outputs) are loaded one at a time afterwards. Every row of a comparison sees
the same prompts: built-in tasks are wrapped in the template the (first) adapter was trained with, read from
its saved recipe, and the base row uses that same template.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..data.config import DatasetSource
from ..errors import DiaBloError
from ..reading import read_text
from ..records import Progress
from . import tasks as builtin
from .generation import GREEDY, Sampling, generate_samples
from .tasks import Item, TaskDefinition

LOCAL_HINT = "pass a local copy in the same format with --data FILE (or `dataset: {path: FILE}` in the recipe)"
TEMPLATES = ("alpaca", "chat", "plain")


@dataclass
class TaskSpec:
    """One task of a run: a built-in benchmark, a custom exact-match set, or `loss` on a training-format set."""

    name: str
    definition: TaskDefinition | None = None  # None: custom (exact match on `dataset`) or loss
    dataset: DatasetSource | None = None  # custom data, or a local copy of a built-in task's data
    loss: bool = False
    max_new_tokens: int | None = None
    limit: int | None = None
    scoring: str = "generate"  # or "loglik" (commonsense, GLUE classification)
    sampling: Sampling = GREEDY
    max_length: int = 1024  # loss: longest row in tokens
    stop: tuple[str, ...] = ()  # extra stop strings, on top of the task's own

    @property
    def family(self) -> str:
        if self.loss:
            return "loss"
        return self.definition.family if self.definition else "custom"


@dataclass
class ModelRow:
    """One column of the comparison: what is evaluated and under which label."""

    label: str
    adapter: Path | None = None  # attached to the shared base
    model: str | None = None  # a standalone model (a merged folder), loaded on its own
    template: str | None = None


@dataclass
class EvalSettings:
    batch_size: int = 16
    limit: int | None = None
    seed: int = 0
    dtype: str | None = None
    template: str | None = None  # overrides what the adapters' recipes say
    allow_code_execution: bool = False
    code_timeout: float = 10.0
    code_memory_mb: int = 2048
    refusal_classifier: str | None = None
    trust_remote_code: bool = False
    revision: str | None = None
    harness: list[str] = field(default_factory=list)
    harness_include: str | None = None
    harness_fewshot: int | None = None


@dataclass
class EvalResult:
    """Scores by model label, then task, then metric (each task also has "n"); predictions per example."""

    scores: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    predictions: list[dict[str, Any]] = field(default_factory=list)
    templates: dict[str, str] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)  # "label/task" -> wall time

    def to_json(self) -> str:
        return json.dumps(self.scores, indent=2, sort_keys=False) + "\n"


# ---- templates ---------------------------------------------------------------------------------------------------


def training_template(recipe: dict[str, Any] | None) -> str | None:
    """The prompt template the recipe's (first) training dataset used: alpaca, chat or plain (chat-format data
    → chat, raw text → plain); None when unknown."""
    from ..data.formats import format_of, template_of

    datasets_ = ((recipe or {}).get("data") or {}).get("datasets") or []
    if not datasets_:
        return None
    try:
        source = DatasetSource.model_validate(datasets_[0])
    except ValueError:
        return None
    fmt = format_of(source)
    return {"chat": "chat", "text": "plain"}.get(fmt) or template_of(source)


# ---- data --------------------------------------------------------------------------------------------------------


def load_items(spec: TaskSpec, limit: int | None) -> list[Item]:
    """The task's questions: from its local file when given, else from where its authors publish it."""
    from ..data.sources import load_rows
    from ..recipe import resolve_data_path

    definition = spec.definition
    assert definition is not None
    limit = spec.limit or limit
    local = spec.dataset.path if spec.dataset is not None else None
    if definition.family == "code":
        from .code import load_humaneval

        problems = load_humaneval(local, limit=limit)
        return [Item(p.prompt, p.canonical_solution, extra={"task_id": p.task_id, "problem": p}) for p in problems]
    if definition.family == "safety" and local and Path(local).suffix.lower() in (".txt", ".csv"):
        return [definition.read({"prompt": line}) for line in _prompt_lines(Path(local))][:limit]
    if local:
        folder = Path(local).expanduser().is_dir()
        split = definition.origin.split if folder and definition.origin else "train"  # a single file is "train"
        sources = [DatasetSource(path=local, split=split, name=spec.dataset.name)]
    elif definition.origin is None:
        raise DiaBloError(f"eval task {spec.name} needs a local file: {LOCAL_HINT}")
    else:
        path = resolve_data_path(definition.origin.path, Path.cwd())
        sources = [DatasetSource(path=path, name=n, split=definition.origin.split) for n in definition.origin.names]
    items: list[Item] = []
    for source in sources:
        rows = load_rows(source, local_hint=LOCAL_HINT)
        builtin.check_task_columns(definition, rows.column_names, f"eval data {source.path!r} ({spec.name})")
        items.extend(definition.read(row) for row in rows)
    return items[:limit] if limit else items


def _prompt_lines(path: Path) -> list[str]:
    """Prompts from a text file (one a line) or a headerless CSV (HEx-PHI's category files: first column)."""
    import csv
    import io

    text = read_text(path, "prompt file")
    if path.suffix.lower() == ".csv":
        return [row[0].strip() for row in csv.reader(io.StringIO(text, newline="")) if row and row[0].strip()]
    return [line.strip() for line in text.splitlines() if line.strip()]


def prompt_ids(item: Item, template: str, tokenizer) -> list[int]:
    """The built-in question rendered exactly as training renders a prompt with ``template``."""
    from ..data.formats import generation_prompt_ids

    source = DatasetSource(path="eval", format="prompt_completion", template=template)
    text = f"{item.instruction}\n\n{item.input}" if item.input else item.instruction
    return generation_prompt_ids({"prompt": text, "completion": ""}, source, tokenizer)


# ---- running -----------------------------------------------------------------------------------------------------


def evaluate_model(
    model,
    tokenizer,
    specs: list[TaskSpec],
    *,
    label: str,
    template: str | None,
    settings: EvalSettings,
    result: EvalResult,
    progress: Progress | None = None,
    log: Callable[[str], None] = lambda message: None,
) -> dict[str, dict[str, float]]:
    """Score one loaded model on every task; fills ``result`` (scores and predictions) and returns its scores."""
    row: dict[str, dict[str, float]] = result.scores.setdefault(label, {})
    for spec in specs:
        started = time.perf_counter()
        chosen = template or (spec.definition.default_template if spec.definition else None)
        if spec.definition is not None and chosen is not None:
            result.templates.setdefault(label, chosen)
        scores, records = _run_task(model, tokenizer, spec, chosen, settings, progress, log)
        row[spec.name] = scores
        result.seconds[f"{label}/{spec.name}"] = round(time.perf_counter() - started, 2)
        for index, record in enumerate(records):
            result.predictions.append({"model": label, "task": spec.name, "index": index, **record})
    _add_averages(row)
    if settings.harness:
        from .harness import run_harness

        log(f"{label}: lm-evaluation-harness on {', '.join(settings.harness)}")
        row.update(
            run_harness(
                model,
                tokenizer,
                settings.harness,
                batch_size=settings.batch_size,
                limit=settings.limit,
                num_fewshot=settings.harness_fewshot,
                include_path=settings.harness_include,
                seed=settings.seed,
            )
        )
    return row


def _run_task(model, tokenizer, spec, template, settings, progress, log):
    if spec.loss:
        return _loss_task(model, tokenizer, spec, settings, progress)
    if spec.definition is None:
        return _custom_task(model, tokenizer, spec, settings, progress)
    items = load_items(spec, settings.limit)
    if not items:
        raise DiaBloError(f"eval task {spec.name} has no examples")
    ids = [prompt_ids(item, template, tokenizer) for item in items]
    family = spec.definition.family
    if spec.scoring == "loglik":
        return _loglik_task(model, tokenizer, spec, items, ids, settings, progress)
    if family == "code" and not settings.allow_code_execution:
        raise DiaBloError(
            "humaneval runs the model's code: pass --allow-code-execution to run it in the sandbox (a subprocess "
            "with time and memory limits, no network, a temporary folder)"
        )
    texts = _generate(model, tokenizer, spec, ids, settings, progress)
    if family == "code":
        return _code_scores(spec, items, texts, settings, progress, log)
    if family == "safety":
        return _safety_scores(items, texts, settings)
    return _judged_scores(spec, items, texts)


def _counter(progress: Progress | None, phase: str, total: int) -> Callable[[int], None]:
    """An ``advance(n)`` callback that adds up increments and reports ``(phase, done, total)`` to ``progress``."""
    done = 0

    def advance(n: int) -> None:
        nonlocal done
        done += n
        if progress:
            progress(phase, done, total)

    return advance


def _generate(model, tokenizer, spec, ids, settings, progress) -> list[list[str]]:
    stop = [*(spec.definition.stop if spec.definition else ()), *spec.stop]
    sampling = spec.sampling
    if sampling.seed != settings.seed:
        sampling = Sampling(sampling.temperature, sampling.top_p, sampling.num_samples, settings.seed)
    return generate_samples(
        model,
        tokenizer,
        ids,
        sampling=sampling,
        max_new_tokens=spec.max_new_tokens or spec.definition.max_new_tokens,
        batch_size=settings.batch_size,
        stop=stop,
        progress=_counter(progress, f"{spec.name}: generating", len(ids)),
    )


def _judged_scores(spec: TaskSpec, items: list[Item], texts: list[list[str]]):
    judge = spec.definition.judge
    records, correct = [], []
    predictions = []
    for item, samples in zip(items, texts, strict=True):
        judgement = judge(samples[0], item)
        correct.append(judgement.correct)
        predictions.append(judgement.extracted)
        records.append(
            {
                "question": item.instruction,
                "generation": samples[0],
                "extracted": judgement.extracted,
                "reference": item.reference,
                "correct": judgement.correct,
            }
        )
    from .metrics import accuracy

    exact = spec.definition.family in ("quickstart", "custom")
    scores = {"exact_match" if exact else "accuracy": accuracy(correct)}
    if spec.definition.family == "glue":
        scores.update(_glue_metrics(spec.definition.name, predictions, items))
    scores["n"] = len(items)
    return scores, records


def _glue_metrics(name: str, predictions: list[str | None], items: list[Item]) -> dict[str, float]:
    from .answers import to_number
    from .metrics import f1_score, matthews_corrcoef, pearson, spearman

    task = name.removeprefix("glue-").removesuffix("-mm")  # MNLI's mismatched dev set is scored as MNLI
    labels = builtin.GLUE_LABELS[task]
    if not labels:
        values = [to_number(p) if p is not None else None for p in predictions]
        fallback = sum(v for v in values if v is not None) / max(1, sum(v is not None for v in values))
        filled = [v if v is not None else fallback for v in values]  # an unreadable answer: the mean guess
        gold = [item.extra["label"] for item in items]
        return {"pearson": pearson(filled, gold), "spearman": spearman(filled, gold)}
    references = [item.reference for item in items]
    if task in ("mrpc", "qqp"):
        return {"f1": f1_score(predictions, references, positive=labels[1])}
    if task == "cola":
        return {"matthews": matthews_corrcoef(predictions, references, positive=labels[1])}
    return {}


def _loglik_task(model, tokenizer, spec, items, ids, settings, progress):
    from .likelihood import best_choice, continuation_logprobs
    from .metrics import accuracy

    if not spec.definition.supports_loglik:
        raise DiaBloError(
            f"eval task {spec.name}: log-likelihood scoring applies to multiple-choice tasks "
            "(commonsense, GLUE classification); use scoring: generate"
        )
    choices = [list(item.choices) for item in items]
    advance = _counter(progress, f"{spec.name}: scoring choices", len(items))
    scores = continuation_logprobs(model, tokenizer, ids, choices, batch_size=settings.batch_size, progress=advance)
    records, hits, hits_norm = [], [], []
    for item, options, values in zip(items, choices, scores, strict=True):
        gold = next((i for i, option in enumerate(options) if _is_gold(option, item)), -1)
        chosen = best_choice(values, options)
        chosen_norm = best_choice(values, options, per_character=True)
        hits.append(chosen == gold)
        hits_norm.append(chosen_norm == gold)
        records.append(
            {
                "question": item.instruction,
                "choices": options,
                "logprobs": [round(v, 4) for v in values],
                "extracted": options[chosen],
                "reference": item.reference,
                "correct": chosen == gold,
            }
        )
    result = {"acc": accuracy(hits), "acc_norm": accuracy(hits_norm), "n": len(items)}
    if spec.definition.family == "glue":
        predictions = [record["extracted"] for record in records]
        result.update(_glue_metrics(spec.definition.name, predictions, items))
    return result, records


def _is_gold(option: str, item: Item) -> bool:
    """A choice is the gold one when it is the reference or ends with it (commonsense answer sentences)."""
    return option == item.reference or option.rstrip(".").endswith(f" {item.reference}")


def _safety_scores(items, texts, settings):
    from .safety import load_classifier

    name, classify = load_classifier(settings.refusal_classifier)
    refused = [bool(classify(item.instruction, samples[0])) for item, samples in zip(items, texts, strict=True)]
    records = [
        {"question": item.instruction, "generation": samples[0], "refused": flag, "classifier": name}
        for item, samples, flag in zip(items, texts, refused, strict=True)
    ]
    return {"refusal_rate": sum(refused) / len(refused), "n": len(items)}, records


def _code_scores(spec, items, texts, settings, progress, log):
    from .code import score_humaneval

    problems = [item.extra["problem"] for item in items]
    n = len(texts[0])
    ks = tuple(k for k in (1, 5, 10) if k <= n)
    total = len(problems) * n
    advance = _counter(progress, f"{spec.name}: running tests in the sandbox", total)
    log(f"running {total} generated programs in the sandbox ({settings.code_timeout:g}s, {settings.code_memory_mb} MB)")
    metrics, outcomes = score_humaneval(
        problems,
        texts,
        ks=ks,
        timeout=settings.code_timeout,
        memory_mb=settings.code_memory_mb,
        progress=advance,
    )
    records = [
        {
            "task_id": problem.task_id,
            "samples": samples,
            "results": [outcome.status for outcome in results],
            "passed": sum(outcome.passed for outcome in results),
        }
        for problem, samples, results in zip(problems, texts, outcomes, strict=True)
    ]
    return {**metrics, "samples_per_problem": n, "n": len(problems)}, records


def _custom_task(model, tokenizer, spec, settings, progress):
    """Exact match on a dataset in a training format, rendered with its own template (the recipe's eval sets)."""
    from ..data import generation_prompt_ids, reference_response
    from .tasks import judge_exact

    examples = _training_format_examples(spec, settings)
    ids = [generation_prompt_ids(example, spec.dataset, tokenizer) for example in examples]
    items = [Item(tokenizer.decode(i), reference_response(e, spec.dataset)) for i, e in zip(ids, examples, strict=True)]
    definition = TaskDefinition(
        spec.name, "custom", "", None, lambda row: row, judge_exact, (), spec.max_new_tokens or 32, (), "plain"
    )
    custom = TaskSpec(spec.name, definition, max_new_tokens=spec.max_new_tokens, sampling=spec.sampling, stop=spec.stop)
    return _judged_scores(custom, items, _generate(model, tokenizer, custom, ids, settings, progress))


def _training_format_examples(spec: TaskSpec, settings: EvalSettings):
    """The raw rows of a custom or loss task's dataset (a training format), limited as asked."""
    from ..data.sources import load_raw_examples

    assert spec.dataset is not None
    examples = load_raw_examples(spec.dataset)
    limit = spec.limit or settings.limit
    return examples.select(range(min(limit, len(examples)))) if limit else examples


def _loss_task(model, tokenizer, spec, settings, progress):
    """Mean loss over the supervised tokens of a training-format dataset, and its perplexity (through
    loss.sequence_logprobs: never a batch's full logits)."""
    import torch

    from ..data.collator import DataCollator
    from ..data.tokenize import tokenize_examples
    from ..loss import seq2seq_loss, sequence_logprobs

    config = model.config
    seq2seq = bool(getattr(config, "is_encoder_decoder", False))  # as training lays it out: prompt → encoder
    raw = _training_format_examples(spec, settings)
    rows = tokenize_examples(
        raw, spec.dataset, tokenizer, max_length=spec.max_length, train_on_inputs=False, seq2seq=seq2seq
    )
    rows = [row for row in rows if row["supervised"]]
    if not rows:
        raise DiaBloError(f"eval task {spec.name}: no example has a supervised token (is the format right?)")
    start = config.decoder_start_token_id if seq2seq else None
    collate = DataCollator(
        tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0, decoder_start_token_id=start
    )
    total_loss, total_tokens = 0.0, 0
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(rows), settings.batch_size):
                chunk = rows[start : start + settings.batch_size]
                batch = collate([{k: r[k] for k in ("input_ids", "labels")} for r in chunk])
                batch = {k: v.to(model.device) for k, v in batch.items()}
                if seq2seq:
                    total_loss += float(seq2seq_loss(model, batch, 1))
                else:
                    logprobs = sequence_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
                    total_loss -= float(logprobs.sum())
                total_tokens += collate.supervised_tokens(batch)
                if progress:
                    progress(f"{spec.name}: loss", min(start + len(chunk), len(rows)), len(rows))
    finally:
        model.train(was_training)
    loss = total_loss / total_tokens
    return {"loss": loss, "perplexity": math.exp(min(loss, 50)), "tokens": total_tokens, "n": len(rows)}, []


def _add_averages(row: dict[str, dict[str, float]]) -> None:
    """The commonsense average over the eight tasks present, as the paper's tables report it."""
    members = [name for name in row if builtin.TASKS.get(name) and builtin.TASKS[name].family == "commonsense"]
    if len(members) < 2:
        return
    metric = "accuracy" if all("accuracy" in row[m] for m in members) else "acc"
    if all(metric in row[m] for m in members):
        row["commonsense-average"] = {
            metric: sum(row[m][metric] for m in members) / len(members),
            "n": sum(row[m]["n"] for m in members),
        }


# ---- files -------------------------------------------------------------------------------------------------------


def predictions_path(json_path: Path) -> Path:
    """Where the per-example predictions go: beside the scores, ``<name>.predictions.jsonl``."""
    return json_path.with_name(f"{json_path.stem}.predictions.jsonl")


def write_results(result: EvalResult, json_path: Path) -> tuple[Path, Path]:
    """The scores as JSON and the predictions as JSON Lines, each written atomically."""
    from ..atomic import write_text_atomic

    predictions = predictions_path(json_path)
    write_text_atomic(json_path, result.to_json())
    write_text_atomic(predictions, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in result.predictions))
    return json_path, predictions


# ---- task specs from flags and recipes ---------------------------------------------------------------------------


def spec_from_name(
    name: str,
    data: str | None = None,
    *,
    scoring: str | None = None,
    sampling: Sampling | None = None,
    max_new_tokens: int | None = None,
    stop: tuple[str, ...] = (),
) -> TaskSpec:
    """A task named on the command line: a built-in one (``data`` a local copy of its data) or `loss` on ``data``."""
    if name.lower() == "loss":
        if data is None:
            raise DiaBloError("the loss task needs --data FILE (a dataset in any training format)")
        from ..data.sources import infer_source

        return TaskSpec("loss", dataset=infer_source(data, local_hint=LOCAL_HINT), loss=True)
    definition = builtin.get_task(name)
    dataset = DatasetSource(path=str(data)) if data is not None else None
    return TaskSpec(
        definition.name,
        definition,
        dataset,
        scoring=scoring or "generate",
        sampling=sampling or GREEDY,
        max_new_tokens=max_new_tokens,
        stop=tuple(stop),
    )


def spec_from_recipe_task(task, max_length: int = 1024) -> TaskSpec:
    """A recipe's `eval.tasks` entry as a task spec (see `diablo_cli.recipe.EvalTask`)."""
    kind = (task.task or task.name).lower()
    sampling = Sampling(task.temperature, task.top_p, task.num_samples)
    if kind == "loss":
        if task.dataset is None:
            raise DiaBloError(f"eval task {task.name}: the loss task needs `dataset:` (any training format)")
        return TaskSpec(task.name, dataset=task.dataset, loss=True, limit=task.limit, max_length=max_length)
    definition = builtin.TASKS.get(kind)
    return TaskSpec(
        task.name,
        definition,
        task.dataset,
        max_new_tokens=task.max_new_tokens,
        limit=task.limit,
        scoring=task.scoring,
        sampling=sampling,
        stop=tuple(task.stop),
    )


HEADLINE_METRICS = ("exact_match", "accuracy", "acc", "pass@1", "refusal_rate", "matthews", "pearson", "loss")


def headline_metric(scores: dict[str, float]) -> tuple[str, float]:
    """The one number a task is known by (accuracy, pass@1, refusal rate, loss ...)."""
    for name in HEADLINE_METRICS:
        if name in scores:
            return name, scores[name]
    name = next(key for key in scores if key != "n")
    return name, scores[name]
