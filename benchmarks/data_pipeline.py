"""How fast the data layer turns raw examples into training rows (load, render with a template, tokenise,
shuffle, drop rows without supervision, optionally pack): examples/s and tokens/s with SmolLM2's tokenizer.

The input is a synthetic JSONL of math-word-problem-sized examples written once per run (deterministic), in
each training format; datasets' cache is off, so every repetition does the whole work. Settings are
interleaved; medians.

    python benchmarks/data_pipeline.py                        # 20,000 examples, 3 repetitions
    python benchmarks/data_pipeline.py --examples 50000 --num-proc 1 2 --markdown
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, medians, table

FORMATS = {  # label -> (format, template, row builder)
    "instruction + alpaca": ("instruction", "alpaca"),
    "prompt_completion + chat": ("prompt_completion", "chat"),
    "chat messages": ("chat", None),
}


def synthetic_rows(count: int, seed: int = 0):
    """Examples shaped like MetaMath/Math10K rows: a ~60-word question, a ~90-word worked answer."""
    rng = random.Random(seed)
    words = ["the", "of", "a", "number", "total", "each", "more", "than", "twice", "how", "many", "apples"]
    words += ["costs", "dollars", "left", "after", "sold", "in", "all", "per", "week", "half", "times"]

    def text(n: int) -> str:
        return " ".join(rng.choice(words) for _ in range(n)) + f" {rng.randint(1, 999)}."

    for _ in range(count):
        question, answer = (
            text(rng.randint(40, 80)),
            text(rng.randint(60, 120)) + f" The answer is {rng.randint(1, 99)}",
        )
        yield question, answer


def write_inputs(folder: Path, count: int) -> dict[str, Path]:
    rows = list(synthetic_rows(count))
    shapes = {
        "instruction": lambda q, a: {"instruction": q, "input": "", "output": a},
        "prompt_completion": lambda q, a: {"prompt": q, "completion": a},
        "chat": lambda q, a: {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]},
    }
    paths = {}
    for name, shape in shapes.items():
        paths[name] = folder / f"{name}.jsonl"
        paths[name].write_text("".join(json.dumps(shape(q, a)) + "\n" for q, a in rows))
    return paths


def prepare_once(path: Path, data_format: str, template: str | None, args, num_proc: int, packing: bool, tokenizer):
    from diablo_cli.data.config import DataConfig, DatasetSource
    from diablo_cli.data.prepare import prepare_data

    source = DatasetSource(path=str(path), format=data_format, template=template)
    config = DataConfig(datasets=[source], max_length=args.max_length, packing=packing, num_proc=num_proc)
    started = time.perf_counter()
    prepared = prepare_data(config, tokenizer, seed=0)
    return time.perf_counter() - started, prepared.stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=20000)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--num-proc", type=int, nargs="+", default=[1], help="tokenising processes to compare")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import datasets

    datasets.disable_caching()
    datasets.disable_progress_bars()
    from transformers import AutoTokenizer

    from diablo_cli.models import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model("smollm2-135m"))
    settings = [
        (label, num_proc, packing)
        for label in FORMATS
        for num_proc in args.num_proc
        for packing in ((False, True) if label == "instruction + alpaca" else (False,))
    ]
    times: dict[tuple, list[float]] = {setting: [] for setting in settings}
    stats = {}
    with tempfile.TemporaryDirectory() as scratch:
        paths = write_inputs(Path(scratch), args.examples)
        for _ in range(args.repeats):
            for setting in settings:
                label, num_proc, packing = setting
                data_format, template = FORMATS[label]
                seconds, stats[setting] = prepare_once(
                    paths[data_format], data_format, template, args, num_proc, packing, tokenizer
                )
                times[setting].append(seconds)
    print(f"# {machine('cpu')}")
    print(f"# {args.examples:,} synthetic examples, max_length {args.max_length}, medians of {args.repeats}")
    header = ["format", "processes", "packing", "seconds", "examples/s", "tokens/s"]
    rows = []
    for setting, seconds in medians(times).items():
        label, num_proc, packing = setting
        tokens = stats[setting].total_tokens
        rows.append(
            [
                label,
                str(num_proc),
                "yes" if packing else "no",
                f"{seconds:.1f}",
                f"{args.examples / seconds:,.0f}",
                f"{tokens / seconds:,.0f}",
            ]
        )
    print(table(header, rows, markdown=args.markdown))


if __name__ == "__main__":
    main()
