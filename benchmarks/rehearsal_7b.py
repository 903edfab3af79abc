"""The whole 7B path at Llama-2-7B's true shapes, through the real CLI, on this machine: a rehearsal for the
design card's user (a 7B model on one A100) where no GPU is at hand.

A Llama-2-7B-shaped model (diablo_cli/resources/models/paper/llama2-7b.json) gets seeded random weights, saved
once as sharded safetensors and cached (rebuilt only when its recorded fingerprint differs). Then, each stage a
fresh process of the real CLI:

  inspect   `diablo inspect` — the memory estimate for this exact shape and micro batch
  train     `diablo train` — QKVUD N=64 (70,254,592 parameters at 32 layers), gradient checkpointing,
            micro batch 1 × 256 tokens, 3 steps, a checkpoint at step 3, and a 4th step (a run saves no
            checkpoint at its last step)
  resume    `diablo train --resume` — one more step from that checkpoint: step 4 again, whose loss must
            match the uninterrupted run's
  merge     `diablo merge --no-verify` — the streamed merge (verification loads whole models, one at a time)
  load      the merged folder with plain transformers: the model built on the meta device from its config, and
            every tensor's name, shape and dtype checked against the safetensors headers (no weights read)

Where the CPU computes bf16 natively all 32 layers run in bf16 (13.5 GB of weights); elsewhere (AVX2 only,
where a bf16 step takes tens of minutes) ``--layers K`` (default 4) of the 32 layers run in fp32 at full width:
every layer's shapes are exact, and the 32-layer step time is extrapolated from the achieved GFLOP/s.
``--fp32`` forces that path here.

Per stage: wall time, peak RSS (the kernel's ru_maxrss of the stage's process, from wait4), peak RssAnon
(sampled every 50 ms: the memory the process allocated itself, without the mmap-ed file pages of the shards) and
the disk it wrote (files under its output modified since it started). Train's peak RSS is set beside inspect's
estimate (RSS, not RssAnon: weights loaded in their file's dtype stay mmap-ed file pages); the train step's
achieved GFLOP/s (the FLOPs of diablo_cli/scaling.py: 2·P forward + 2·P backward + 2·P recomputed per token for the
frozen base, 8·T for the adapter, attention on top) beside a plain matmul's at the model's shapes; merge's peak
above an idle process beside 1.5 × the largest shard; the adapter file beside 70,254,592 × 4 bytes + its header.
The matmul probe runs after the stages: on a shared machine the ratio also holds whatever else ran meanwhile.

    python benchmarks/rehearsal_7b.py --cache /work/rehearsal-cache --markdown
    python benchmarks/rehearsal_7b.py --layers 1 --fp32          # the AVX2 path, one layer, fast
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, status_kib, table

PAPER_CONFIG = Path(__file__).parents[1] / "diablo_cli" / "resources" / "models" / "paper" / "llama2-7b.json"
FULL_LAYERS = 32
BLOCKS = 64
PAPER_TRAINABLE = 70_254_592  # Llama-2-7B, QKVUD, N=64 (paper Table 11; DESIGN.md)
SEED = 1234
MODEL_FORMAT = 1  # bump when the way the random model is made changes: the cache is rebuilt
FINGERPRINT_FILE = "rehearsal-model.json"
GIB = 2**30
TEXT = """the model learns a small block of every layer while the frozen base keeps its weights and the loss falls
slowly over a few steps on a machine with two cores and no accelerator so each step takes a while but the shapes are
those of a seven billion parameter network with thirty two layers of four thousand wide"""


def model_settings(layers: int, dtype: str) -> dict:
    """The paper's Llama-2-7B config with ``layers`` of its 32 layers and the dtype the weights are saved in."""
    config = json.loads(PAPER_CONFIG.read_text())
    config.update(num_hidden_layers=layers, torch_dtype=dtype, dtype=dtype)
    return config


def fingerprint(config: dict, shard_bytes: int) -> str:
    recipe = {"config": config, "seed": SEED, "shard_bytes": shard_bytes, "format": MODEL_FORMAT, "vocab": 32000}
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


def truncated_tokenizer(vocab_size: int):
    """The bundled SmolLM2 byte-level BPE cut to its first ``vocab_size`` tokens (Llama-2's 32,000): merges that
    make a dropped token go too, so every id it produces is a row of the model's embedding."""
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from diablo_cli.models import bundled_model_dir

    source = AutoTokenizer.from_pretrained(bundled_model_dir())
    spec = json.loads(source.backend_tokenizer.to_str())
    vocab = {token: index for token, index in spec["model"]["vocab"].items() if index < vocab_size}
    spec["model"]["vocab"] = vocab
    spec["model"]["merges"] = [
        pair for pair in spec["model"]["merges"] if pair[0] in vocab and pair[1] in vocab and "".join(pair) in vocab
    ]
    spec["added_tokens"] = [token for token in spec["added_tokens"] if token["id"] < vocab_size]
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(spec)),
        bos_token=source.bos_token,
        eos_token=source.eos_token,
        pad_token=source.pad_token,
        unk_token=source.unk_token,
    )
    tokenizer.chat_template = source.chat_template
    return tokenizer


def build_model(folder: Path, config: dict, shard_bytes: int) -> None:
    """Random weights (normal, std = initializer_range; norms 1), one seeded generator per tensor, written shard by
    shard in Hugging Face's layout (model-0000i-of-0000n.safetensors + index), never more than a shard in memory."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    dtype = getattr(torch, config["torch_dtype"])
    with torch.device("meta"):
        skeleton = LlamaForCausalLM(LlamaConfig(**config))
    names = [(name, tuple(p.shape)) for name, p in skeleton.state_dict().items()]
    folder.mkdir(parents=True)
    shards: list[list[str]] = [[]]
    sizes = [0]
    for name, shape in names:
        size = dtype.itemsize * int(torch.Size(shape).numel())
        if sizes[-1] and sizes[-1] + size > shard_bytes:
            shards.append([])
            sizes.append(0)
        shards[-1].append(name)
        sizes[-1] += size
    shapes = dict(names)
    positions = {name: position for position, (name, _) in enumerate(names)}
    index: dict[str, str] = {}
    for number, members in enumerate(shards, start=1):
        file = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name in members:
            index[name] = file
            if name.endswith("norm.weight"):
                tensors[name] = torch.ones(shapes[name], dtype=dtype)
                continue
            generator = torch.Generator().manual_seed(SEED + positions[name])
            tensors[name] = torch.empty(shapes[name], dtype=dtype).normal_(
                0.0, config["initializer_range"], generator=generator
            )
        save_file(tensors, str(folder / file), metadata={"format": "pt"})
        del tensors
        print(f"#   wrote {file} ({sizes[number - 1] / GIB:.2f} GiB)", flush=True)
    total = sum(sizes)
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": index}, indent=2)
    )


def model_folder(cache: Path, layers: int, dtype: str) -> Path:
    return cache / f"llama2-7b-shape-{layers}L-{dtype}"


def ensure_model(cache: Path, layers: int, dtype: str, shard_bytes: int) -> None:
    """The cached random model for these settings, made when absent or when its fingerprint differs."""
    config = model_settings(layers, dtype)
    folder = model_folder(cache, layers, dtype)
    marker = folder / FINGERPRINT_FILE
    wanted = fingerprint(config, shard_bytes)
    if marker.is_file() and json.loads(marker.read_text()).get("fingerprint") == wanted:
        print(f"# {folder}: cached (fingerprint {wanted})", flush=True)
        return
    if folder.exists():
        if not marker.is_file():
            raise SystemExit(f"{folder} exists and was not made by this script ({FINGERPRINT_FILE} missing): move it")
        shutil.rmtree(folder)
    tokenizer = truncated_tokenizer(config["vocab_size"])
    config.update(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    config["pad_token_id"] = tokenizer.pad_token_id
    print(f"# building {folder} (seed {SEED}, {layers} layers, {dtype}) — once; cached after", flush=True)
    build_model(folder, config, shard_bytes)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    tokenizer.save_pretrained(folder)
    marker.write_text(json.dumps({"fingerprint": wanted, "seed": SEED, "layers": layers, "dtype": dtype}))


def write_data(path: Path, rows: int = 32, words: int = 400) -> None:
    """Seeded word salad in plain-text rows longer than the 256 tokens kept of each: every micro batch is full."""
    import random

    generator = random.Random(SEED)
    words_of_text = TEXT.split()
    with path.open("w") as handle:
        for _ in range(rows):
            handle.write(
                json.dumps({"text": " ".join(generator.choice(words_of_text) for _ in range(words)) + "."}) + "\n"
            )


def write_recipe(path: Path, model: Path, data: Path, run: Path, dtype: str, steps: int, seq_len: int) -> None:
    import yaml

    recipe = {
        "base_model": str(model),
        "model": {"dtype": dtype, "gradient_checkpointing": True},
        "adapter": {"blocks": BLOCKS, "target_modules": "QKVUD", "dtype": "float32"},
        "data": {"datasets": [{"path": str(data), "format": "text"}], "max_length": seq_len},
        "training": {
            "max_steps": steps + 1,  # the checkpoint at `steps`, then one step that --resume replays
            "micro_batch_size": 1,
            "learning_rate": 1e-4,
            "lr_scheduler": "constant",
            "logging_steps": 1,
            "save_steps": steps,
        },
        "output": {"dir": str(run), "overwrite": True},
    }
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))


def bytes_written_since(started: float, folders: list[Path]) -> int:
    """Bytes of the files under ``folders`` modified at or after ``started`` (a time.time()): what a stage wrote
    and kept, rewritten files included."""
    files = (f for folder in folders if folder.exists() for f in folder.rglob("*") if f.is_file())
    return sum(stat.st_size for stat in (f.stat() for f in files) if stat.st_mtime >= started)


def run_stage(name: str, command: list[str], watched: list[Path], log: Path) -> dict:
    """One stage in a fresh process: wall seconds, ru_maxrss (wait4) and sampled peak RssAnon in bytes, and the
    bytes that appeared under ``watched``."""
    wall_started = time.time()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    started = time.perf_counter()
    with log.open("w") as handle:
        process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=env)
        peak_anon = [0]
        stop = threading.Event()

        def sample() -> None:
            while not stop.is_set():
                peak_anon[0] = max(peak_anon[0], status_kib(process.pid, "RssAnon"))
                time.sleep(0.05)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        _, status, usage = os.wait4(process.pid, 0)
        stop.set()
        sampler.join()
        process.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - started
    if process.returncode != 0:
        raise SystemExit(f"stage {name} failed (exit {process.returncode}); its log {log}:\n{log.read_text()[-3000:]}")
    print(f"#   {name}: {seconds:.1f} s, peak RSS {usage.ru_maxrss / 2**20:.2f} GiB", flush=True)
    return {
        "seconds": seconds,
        "max_rss": usage.ru_maxrss * 1024,
        "peak_anon": peak_anon[0] * 1024,
        "written": bytes_written_since(wall_started, watched),
    }


def diablo(*arguments: str) -> list[str]:
    return [sys.executable, "-m", "diablo_cli", *arguments]


def python_code(code: str, *arguments: str) -> list[str]:
    return [sys.executable, "-c", code, *arguments]


LOAD_CHECK = """
import json, sys, torch
from pathlib import Path
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM
folder = Path(sys.argv[1])
config = AutoConfig.from_pretrained(folder)
with torch.device("meta"):
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(config, "dtype", None) or config.torch_dtype)
expected = {name: (tuple(t.shape), t.dtype) for name, t in model.state_dict().items()}
found = {}
for file in sorted(folder.glob("*.safetensors")):
    with safe_open(str(file), framework="pt") as handle:
        for name in handle.keys():
            part = handle.get_slice(name)
            found[name] = (tuple(part.get_shape()), part.get_dtype())
dtypes = {torch.bfloat16: "BF16", torch.float32: "F32", torch.float16: "F16"}
wrong = [n for n, (shape, dtype) in expected.items() if n not in found or found[n] != (shape, dtypes[dtype])]
extra = sorted(set(found) - set(expected))
print(json.dumps({"tensors": len(found), "expected": len(expected), "wrong": wrong[:5], "extra": extra[:5]}))
sys.exit(1 if wrong or extra else 0)
"""

MATMUL_PROBE = """
import json, sys, time, torch
dtype = getattr(torch, sys.argv[1]); tokens = int(sys.argv[2])
best = {}
for inner, outer in ((4096, 4096), (4096, 11008), (11008, 4096)):
    x = torch.randn(tokens, inner).to(dtype); w = torch.randn(outer, inner).to(dtype)
    torch.nn.functional.linear(x, w)
    started = time.perf_counter(); runs = 5
    for _ in range(runs):
        torch.nn.functional.linear(x, w)
    best[f"{inner}x{outer}"] = 2 * tokens * inner * outer * runs / (time.perf_counter() - started) / 1e9
print(json.dumps(best))
"""


def step_flops(model: Path, layers: int, trainable: int, seq_len: int) -> float:
    """Training FLOPs of one 1 × seq_len micro batch, by scaling.py's count (recompute included)."""
    from transformers import AutoConfig

    from diablo_cli.scaling import training_flops_per_token

    config = AutoConfig.from_pretrained(model)
    hidden, inner, vocab = config.hidden_size, config.intermediate_size, config.vocab_size
    per_layer = 4 * hidden * hidden + 3 * hidden * inner
    flops = training_flops_per_token(
        linear_parameters=layers * per_layer + hidden * vocab,
        head_parameters=hidden * vocab,
        trainable_parameters=trainable,
        layers=layers,
        attention_width=hidden,
        seq_len=seq_len,
        gradient_checkpointing=True,
    )
    return flops.total * seq_len


def step_records(run: Path) -> list[dict]:
    """The run's per-step metrics records (logging_steps 1), in order."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in records if "tokens_per_s" in r]


def main() -> None:
    from diablo_cli.precision import hardware

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "diablo-cli" / "rehearsal-7b")
    parser.add_argument("--layers", type=int, default=None, help="of the 32; default 32 in bf16, 4 in fp32")
    parser.add_argument("--fp32", action="store_true", help="the AVX2 path: fp32, --layers K (default 4)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--shard-gb", type=float, default=5.0, help="the random model's largest shard (GB)")
    parser.add_argument("--keep-merged", action="store_true", help="leave the merged model on disk")
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--build-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    native = hardware().bf16
    dtype = "float32" if args.fp32 or not native else "bfloat16"
    layers = args.layers or (FULL_LAYERS if dtype == "bfloat16" else 4)
    if not 1 <= layers <= FULL_LAYERS:
        raise SystemExit(f"--layers {layers}: give 1 to {FULL_LAYERS}")
    shard_bytes = int(args.shard_gb * 1e9)
    cache = args.cache.expanduser()
    cache.mkdir(parents=True, exist_ok=True)
    if args.build_only:
        ensure_model(cache, layers, dtype, shard_bytes)
        return
    print(f"# {machine('cpu')}")
    why = "native bf16" if dtype == "bfloat16" else ("--fp32" if args.fp32 else "no native bf16 (AVX2 path)")
    print(f"# Llama-2-7B shape, {layers} of 32 layers in {dtype} ({why}); QKVUD N={BLOCKS}; 1 × {args.seq_len}")

    started = time.perf_counter()
    build = [sys.executable, __file__, "--build-only", "--cache", str(cache), "--layers", str(layers)]
    build += ["--shard-gb", str(args.shard_gb)] + (["--fp32"] if dtype == "float32" else [])
    subprocess.run(build, check=True)  # in a child: this process stays small (stages inherit its peak RSS)
    build_seconds = time.perf_counter() - started
    model = model_folder(cache, layers, dtype)
    work = cache / f"run-{layers}L-{dtype}"
    work.mkdir(exist_ok=True)
    run, merged, data, recipe = work / "adapter", work / "merged", work / "data.jsonl", work / "recipe.yaml"
    write_data(data)
    write_recipe(recipe, model, data, run, "bf16" if dtype == "bfloat16" else "fp32", args.steps, args.seq_len)
    short = "bf16" if dtype == "bfloat16" else "fp32"
    stages: dict[str, dict] = {}
    inspect_json = work / "inspect.json"
    stages["inspect"] = run_stage(
        "inspect",
        diablo(
            "inspect",
            str(model),
            "--targets",
            "QKVUD",
            "--blocks",
            str(BLOCKS),
            "--seq-len",
            str(args.seq_len),
            "--batch",
            "1",
            "--dtype",
            short,
            "--gradient-checkpointing",
            "--json",
        ),
        [],
        inspect_json,
    )
    estimate = json.loads(inspect_json.read_text())
    diablo_row = next(row for row in estimate["memory"] if row["method"] == "DiaBlo")
    stages["train"] = run_stage("train", diablo("train", str(recipe)), [run], work / "train.log")
    trained = step_records(run)
    stages["resume"] = run_stage("resume", diablo("train", str(recipe), "--resume"), [run], work / "resume.log")
    resumed = step_records(run)[-1]
    steps_trained = [args.seq_len / r["tokens_per_s"] for r in trained]
    stages["merge"] = run_stage(
        "merge",
        diablo("merge", "--adapter", str(run), "--output", str(merged), "--overwrite", "--no-verify"),
        [merged],
        work / "merge.log",
    )
    load_log = work / "load.log"
    stages["load"] = run_stage("load", python_code(LOAD_CHECK, str(merged)), [], load_log)
    loaded = json.loads(load_log.read_text().strip().splitlines()[-1])
    probe = json.loads(
        subprocess.run(
            python_code(MATMUL_PROBE, dtype, str(args.seq_len)), capture_output=True, text=True, check=True
        ).stdout
    )
    idle = idle_process_anon()

    from safetensors import safe_open

    adapter_file = run / "adapter_model.safetensors"
    with safe_open(str(adapter_file), framework="pt") as handle:
        trainable = sum(
            handle.get_slice(name).get_shape()[0] * _rest(handle.get_slice(name).get_shape())
            for name in handle.keys()  # noqa: SIM118 (safe_open is no dict)
        )
    header = int.from_bytes(adapter_file.read_bytes()[:8], "little") + 8
    largest_shard = max(f.stat().st_size for f in model.glob("*.safetensors"))
    flops = step_flops(model, layers, trainable, args.seq_len)
    timed = sorted(steps_trained[1:] or steps_trained)  # the first step also warms up
    step = timed[len(timed) // 2]
    achieved = flops / step / 1e9
    matmul = max(probe.values())
    full_flops = step_flops(model, FULL_LAYERS, PAPER_TRAINABLE, args.seq_len)

    rows = []
    for name, stage in stages.items():
        rows.append(
            [
                name,
                f"{stage['seconds']:.1f}",
                f"{stage['max_rss'] / GIB:.2f}",
                f"{stage['peak_anon'] / GIB:.2f}",
                f"{stage['written'] / GIB:.3f}",
            ]
        )
    print()
    print(
        table(
            ["stage", "wall (s)", "peak RSS (GiB)", "peak RssAnon (GiB)", "disk written (GiB)"],
            rows,
            markdown=args.markdown,
        )
    )
    print()
    train_peak = max(stages["train"]["max_rss"], stages["resume"]["max_rss"])
    estimate_bytes = diablo_row["checkpointed_total"]
    merge_above = stages["merge"]["peak_anon"] - idle
    expected_adapter = trainable * 4 + header
    checks = [
        [
            "train peak RSS (train, resume) vs inspect's estimate",
            f"{train_peak / GIB:.2f} vs {estimate_bytes / GIB:.2f} GiB",
            f"{train_peak / estimate_bytes - 1:+.1%}",
            _verdict(abs(train_peak / estimate_bytes - 1) <= 0.20),
        ],
        [
            "merge peak RssAnon above an idle process vs 1.5 × largest shard",
            f"{merge_above / GIB:.2f} vs {1.5 * largest_shard / GIB:.2f} GiB",
            f"{merge_above / (1.5 * largest_shard):.2f}×",
            _verdict(merge_above <= 1.5 * largest_shard),
        ],
        [
            "train step: achieved vs a plain matmul at these shapes",
            f"{achieved:.1f} vs {matmul:.1f} GFLOP/s ({step:.1f} s/step, {flops / 1e12:.2f} TFLOP/step)",
            f"{matmul / achieved:.2f}× slower",
            _verdict(matmul / achieved <= 2.0),
        ],
        [
            "adapter file vs trainable × 4 bytes + header",
            f"{adapter_file.stat().st_size:,} vs {expected_adapter:,} B ({trainable:,} parameters)",
            "exact" if adapter_file.stat().st_size == expected_adapter else "differs",
            _verdict(adapter_file.stat().st_size == expected_adapter),
        ],
        [
            f"resumed step {resumed['step']} vs the uninterrupted run's",
            f"loss {resumed['loss']:.6f} vs {trained[-1]['loss']:.6f}",
            f"{resumed['loss'] - trained[-1]['loss']:+.2e}",
            _verdict(resumed["step"] == trained[-1]["step"] and abs(resumed["loss"] - trained[-1]["loss"]) < 1e-3),
        ],
        [
            "merged folder loads (meta device; headers)",
            f"{loaded['tensors']} of {loaded['expected']} tensors, names/shapes/dtypes",
            "",
            _verdict(not loaded["wrong"] and not loaded["extra"]),
        ],
    ]
    if layers < FULL_LAYERS:
        full_estimate = paper_estimate(short, args.seq_len)
        checks += [
            [
                f"32-layer step, extrapolated at the achieved rate ({layers} layers ran)",
                f"{full_flops / 1e12:.2f} TFLOP/step → {full_flops / (achieved * 1e9):.0f} s/step",
                "",
                "extrapolated",
            ],
            [
                "32-layer train peak: inspect's 32-layer estimate × measured/estimated here",
                f"{full_estimate / GIB:.2f} GiB × {train_peak / estimate_bytes:.3f} = "
                f"{full_estimate * train_peak / estimate_bytes / GIB:.2f} GiB",
                "",
                "extrapolated",
            ],
        ]
    print(table(["target", "measured", "ratio", "met"], checks, markdown=args.markdown))
    print(
        f"\n# train steps (s): {', '.join(f'{s:.1f}' for s in steps_trained)}; model "
        f"ready in {build_seconds:.0f} s (built, or found cached); idle process RssAnon {idle / GIB:.2f} GiB; "
        f"largest shard {largest_shard / GIB:.2f} GiB; matmul probe (GFLOP/s): "
        + ", ".join(f"{k} {v:.1f}" for k, v in probe.items())
    )
    print(
        "# inspect's estimate, by part (GiB): "
        + ", ".join(
            f"{key} {diablo_row[key] / GIB:.2f}"
            for key in (
                "weights",
                "adapter_and_optimizer",
                "checkpointed_activations",
                "checkpointed_adapter_inputs",
                "logits",
            )
        )
    )
    if not args.keep_merged:
        shutil.rmtree(merged, ignore_errors=True)


def paper_estimate(dtype: str, seq_len: int) -> float:
    """`diablo inspect`'s checkpointed training memory for the shipped 32-layer Llama-2-7B config (no weights
    read), in bytes."""
    command = diablo("inspect", "llama2-7b", "--targets", "QKVUD", "--blocks", str(BLOCKS), "--seq-len", str(seq_len))
    command += ["--batch", "1", "--dtype", dtype, "--gradient-checkpointing", "--json"]
    done = subprocess.run(
        command, capture_output=True, text=True, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}
    )
    rows = json.loads(done.stdout)["memory"]
    return next(row for row in rows if row["method"] == "DiaBlo")["checkpointed_total"]


def _rest(shape: list[int]) -> int:
    count = 1
    for size in shape[1:]:
        count *= size
    return count


def _verdict(met: bool) -> str:
    return "yes" if met else "**no**"


def idle_process_anon() -> int:
    """RssAnon of a process that imported what `diablo merge` imports, and nothing more, in bytes."""
    code = "import diablo_cli.merge, transformers, torch; print(open('/proc/self/status').read())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return next(int(line.split()[1]) for line in out.splitlines() if line.startswith("RssAnon:")) * 1024


if __name__ == "__main__":
    main()
