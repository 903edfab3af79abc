"""Run by tests/test_distributed.py: real FSDP on CPU, 2 processes over gloo, on a tiny bf16 Llama with fp32 DiaBlo
blocks, set up by diablo_cli.distributed.configure_sharding exactly as train.py would, then compared with the same
step computed in one process without sharding. Writes RESULTS_DIR/<variant>.json (rank 0).

    python tests/data/fsdp_ranks.py RESULTS_DIR PORT

Variants: ``fsdp1`` (FullyShardedDataParallel with diablo's wrap policy and use_orig_params; rank 1 builds its
model on the meta device and receives rank 0's weights, as with accelerate's cpu_ram_efficient_loading) and
``fsdp2`` (accelerate's own FSDP2 preparation, fsdp2_prepare_model, with the plugin configure_sharding set).
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).parents[1]))  # tests/, for conftest's tiny model

from rank_reference import (
    LEARNING_RATE,
    batch,
    optimizer_state_difference,
    unsharded_steps,
    worst_relative,
)

CONFIG = {"blocks": 4, "target_modules": "QKVOGUD", "kernel": "auto"}  # auto: configure_sharding must switch it


def build_model(on_meta: bool):
    from conftest import TINY_LLAMA, randomize_adapters, tiny_llama
    from transformers import LlamaConfig, LlamaForCausalLM

    import diablo_cli

    if on_meta:  # what a non-zero rank holds after cpu_ram_efficient_loading: shapes, no weights
        with torch.device("meta"):
            model = LlamaForCausalLM(LlamaConfig(**TINY_LLAMA)).to(torch.bfloat16)
    else:
        model = tiny_llama(dtype=torch.bfloat16)
    diablo_cli.attach_diablo(model, diablo_cli.DiaBloConfig(**CONFIG))
    if not on_meta:
        randomize_adapters(model)  # non-zero blocks, so that the forward depends on them
    return model.train()


def fake_accelerator(plugin, fsdp2: bool):
    """What diablo_cli.distributed and accelerate's fsdp2_prepare_model read from an Accelerator; accelerate itself
    never picks FSDP on CPU (cpu=True means MULTI_CPU, i.e. DDP). Like accelerate's, unwrap_model leaves an FSDP
    model as it is."""
    from accelerate.utils import DistributedType

    return SimpleNamespace(
        distributed_type=DistributedType.FSDP,
        unwrap_model=lambda model: model,
        is_fsdp2=fsdp2,
        num_processes=dist.get_world_size(),
        is_main_process=dist.get_rank() == 0,
        mixed_precision="bf16",
        device=torch.device("cpu"),
        state=SimpleNamespace(fsdp_plugin=plugin),
    )


def shared(value):
    """Rank 0's value on every rank: what each process reads from the checkpoint file when a run resumes."""
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def compare(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> dict:
    missing = sorted(set(want) - set(got))
    worst = worst_relative(got, {n: t for n, t in want.items() if n in got})
    return {"missing": missing, "worst_relative_difference": worst, "count": len(got)}


def checkpoint_round_trip(rank: int, accelerator, wrapped, optimizer, want: dict, prepare) -> tuple[dict, dict]:
    """What train.py saves after a step (the gathered weights, complete on rank 0) and what its checkpoint holds
    (the full optimizer state), compared with one unsharded process, then resumed in a fresh sharded run.
    Returns the gathered weights and, on rank 0, the comparisons."""
    from diablo_cli.distributed import full_optimizer_state, gather_trainable

    after = gather_trainable(accelerator, wrapped, "fsdp")
    state = full_optimizer_state(accelerator, wrapped, optimizer, "fsdp")
    # compared before resuming: loading it into the resumed run's optimizer may share its tensors
    difference = optimizer_state_difference(state, want["optimizer"]) if rank == 0 else None
    second = resume_and_step(rank, after, state, prepare)
    if rank != 0:
        return after, {}
    return after, {"optimizer_state": difference, "resumed_step": compare(second, want["second"])}


def resume_and_step(rank: int, weights: dict, state: dict, prepare) -> dict[str, torch.Tensor]:
    """What train.py does with a checkpoint under FSDP: a fresh model takes the weights before wrapping
    (``prepare(model)`` → accelerator, wrapped model, optimizer) and the optimizer state after; then one step. Every
    rank reads the checkpoint, so rank 0's gathered values go to all. Returns the gathered weights after the step."""
    from diablo_cli.distributed import gather_trainable, load_full_optimizer_state

    weights, state = shared(weights), shared(state)
    fresh = build_model(on_meta=False)
    fresh.load_state_dict(weights, strict=False)
    accelerator, wrapped, optimizer = prepare(fresh)[:3]
    load_full_optimizer_state(accelerator, wrapped, optimizer, "fsdp", state)
    wrapped(input_ids=batch(rank), labels=batch(rank)).loss.backward()
    optimizer.step()
    return gather_trainable(accelerator, wrapped, "fsdp")


def run_fsdp1(rank: int, on_meta: bool = False) -> dict:
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    from diablo_cli.adapter.model import bare_name

    model = build_model(on_meta=on_meta and rank == 1)
    want = unsharded_steps(model, weight_decay=0.0) if rank == 0 else None
    accelerator, wrapped, optimizer, notes = wrap_fsdp1(model, on_meta=on_meta)
    kernels = sorted({layer.kernel for layer in model.modules() if hasattr(layer, "diablo_blocks")})
    units = [unit for unit in FSDP.fsdp_modules(wrapped) if unit._has_params]
    # accelerate's prepare_model upcasts to fp32 every unit whose flat parameter is low-precision and trainable
    upcast = sum(unit._flat_param.dtype != torch.float32 and unit._flat_param.requires_grad for unit in units)
    loss = wrapped(input_ids=batch(rank), labels=batch(rank)).loss
    loss.backward()
    trainable = [p for p in wrapped.parameters() if p.requires_grad]
    local_norm = torch.linalg.vector_norm(  # what clipping the trainable subset shard by shard would see
        torch.stack([p.grad.norm() for p in trainable if p.grad is not None])
    ).item()
    with FSDP.summon_full_params(wrapped, with_grads=True):
        grads = {bare_name(n): p.grad.detach().clone() for n, p in wrapped.named_parameters() if p.requires_grad}
    norm = wrapped.clip_grad_norm_(1e9).item()  # FSDP's own: the norm over all shards
    optimizer.step()
    local_norms = [torch.zeros(()) for _ in range(2)]
    dist.all_gather(local_norms, torch.tensor(local_norm))
    after, checkpoint = checkpoint_round_trip(
        rank, accelerator, wrapped, optimizer, want, lambda model: wrap_fsdp1(model, on_meta=False)
    )
    if rank != 0:
        return {}
    return {
        **checkpoint,
        "notes": notes,
        "kernels": kernels,
        "units": len(units),
        "units_accelerate_would_upcast": upcast,
        "grads": compare(grads, want["grads"]),
        "after_step": compare(after, want["after"]),
        "norm": norm,
        "reference_norm": want["norm"],
        "local_subset_norms": [float(n) for n in local_norms],
    }


def wrap_fsdp1(model, *, on_meta: bool):
    """configure_sharding, the optimizer and FSDP1 as train.py and accelerate's prepare_model do them."""
    from accelerate.utils import FullyShardedDataParallelPlugin
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    from diablo_cli.distributed import configure_sharding

    # as accelerate builds it from fsdp.yaml, less sync_module_states (its plugin wants a GPU for that)
    plugin = FullyShardedDataParallelPlugin(fsdp_version=1, use_orig_params=False, state_dict_type="FULL_STATE_DICT")
    plugin.set_mixed_precision("bf16")
    accelerator = fake_accelerator(plugin, fsdp2=False)
    notes = configure_sharding(accelerator, model)
    optimizer = torch.optim.AdamW(  # before wrapping, as train.py does
        [p for p in model.parameters() if p.requires_grad], lr=LEARNING_RATE, weight_decay=0.0
    )
    wrapped = FSDP(  # the arguments accelerate's prepare_model passes for FSDP1
        model,
        sharding_strategy=plugin.sharding_strategy,
        auto_wrap_policy=plugin.auto_wrap_policy,
        mixed_precision=plugin.mixed_precision_policy,
        use_orig_params=plugin.use_orig_params,
        sync_module_states=on_meta,
        param_init_fn=lambda module: module.to_empty(device=torch.device("cpu"), recurse=False),
        device_id=torch.device("cpu"),
    )
    return accelerator, wrapped, optimizer, notes


def run_fsdp2(rank: int) -> dict:
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model
    from torch.distributed.tensor import DTensor

    from diablo_cli.distributed import (
        configure_sharding,
    )

    def prepared(model):
        plugin = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap")
        plugin.set_mixed_precision("bf16")
        accelerator = fake_accelerator(plugin, fsdp2=True)
        notes = configure_sharding(accelerator, model)
        model = fsdp2_prepare_model(accelerator, model)  # accelerate's own FSDP2 preparation
        trainable = [p for p in model.parameters() if p.requires_grad]
        return accelerator, model, torch.optim.AdamW(trainable, lr=LEARNING_RATE, weight_decay=0.0), notes

    model = build_model(on_meta=False)
    want = unsharded_steps(model, weight_decay=0.0) if rank == 0 else None
    accelerator, model, optimizer, notes = prepared(model)
    sharded = sum(isinstance(p, DTensor) for p in model.parameters())
    trainable = [p for p in model.parameters() if p.requires_grad]
    loss = model(input_ids=batch(rank), labels=batch(rank)).loss
    loss.backward()
    grads = {n: p.grad.full_tensor() for n, p in model.named_parameters() if p.requires_grad}
    norm = torch.nn.utils.clip_grad_norm_(trainable, 1e9)
    norm = norm.full_tensor() if isinstance(norm, DTensor) else norm
    optimizer.step()
    after, checkpoint = checkpoint_round_trip(rank, accelerator, model, optimizer, want, prepared)
    if rank != 0:
        return {}
    return {
        **checkpoint,
        "notes": notes,
        "sharded_parameters": sharded,
        "block_dtypes": sorted({str(p.dtype) for p in trainable}),
        "grads": compare(grads, want["grads"]),
        "after_step": compare(after, want["after"]),
        "norm": norm.item(),
        "reference_norm": want["norm"],
    }


def worker(rank: int, results: str, port: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RANK=str(rank), WORLD_SIZE="2")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        variants = {
            "fsdp1": run_fsdp1,
            "fsdp2": run_fsdp2,
            "fsdp1-rank0-loading": lambda rank: run_fsdp1(rank, on_meta=True),
        }
        for variant, run in variants.items():
            try:
                outcome = run(rank)
            except Exception as err:  # recorded for the test, which skips with the exact error
                outcome = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()[-3000:]}
            if rank == 0:
                (Path(results) / f"{variant}.json").write_text(json.dumps(outcome, indent=1))
            dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    results_dir, port = sys.argv[1:3]
    mp.spawn(worker, args=(results_dir, port), nprocs=2)
