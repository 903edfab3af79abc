"""Run by tests/test_distributed.py when DeepSpeed is installed (it is not a dependency): DeepSpeed ZeRO-2 and ZeRO-3
on CPU (DS_ACCELERATOR=cpu), 2 processes over gloo, on a tiny bf16 Llama with fp32 DiaBlo blocks, the DeepSpeed
config set by diablo_cli.distributed.configure_sharding from a plugin in bf16 mode (a recipe with
training.mixed_precision: bf16), compared with the same step in one process. Writes RESULTS_DIR/<variant>.json.

    DS_ACCELERATOR=cpu python tests/data/deepspeed_ranks.py RESULTS_DIR PORT

ZeRO-3 builds the base under ``deepspeed.zero.Init`` first, as transformers does with accelerate's zero3_init_flag.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).parents[1]))  # tests/, for conftest's tiny model

from rank_reference import (
    LEARNING_RATE,
    MICRO_BATCH,
    batch,
    optimizer_state_difference,
    unsharded_steps,
    worst_relative,
)


def diablo_config():
    import diablo_cli

    return diablo_cli.DiaBloConfig(blocks=4, target_modules="QKVOGUD", kernel="auto")  # auto: must become blocks


def build(stage: int):
    """The tiny bf16 Llama with fp32 blocks, as train.py holds it before prepare: under ZeRO-3 the base built
    already sharded, in the config's dtype, then loaded from rank 0."""
    import deepspeed
    from accelerate.utils import DeepSpeedPlugin, DistributedType
    from conftest import TINY_LLAMA, randomize_adapters, tiny_llama
    from transformers import LlamaConfig, LlamaForCausalLM

    import diablo_cli

    plugin = DeepSpeedPlugin(zero_stage=stage, zero3_init_flag=stage == 3)
    plugin.set_mixed_precision("bf16")  # what AcceleratorState does for training.mixed_precision: bf16
    plain = tiny_llama(dtype=torch.bfloat16)
    if stage == 3:  # as accelerate's set_deepspeed_weakref hands it to transformers: the "auto" batch fields filled
        init_config = {k: v for k, v in plugin.deepspeed_config.items() if k != "train_batch_size"}
        init_config.update(train_micro_batch_size_per_gpu=1, gradient_accumulation_steps=1)
        with deepspeed.zero.Init(config_dict_or_path=init_config):
            model = LlamaForCausalLM(LlamaConfig(**TINY_LLAMA))
        with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=0), torch.no_grad():
            for mine, theirs in zip(model.parameters(), plain.parameters(), strict=True):
                mine.copy_(theirs)
    else:
        model = plain
    diablo_cli.attach_diablo(model, diablo_config())
    randomize_adapters(model)
    accelerator = SimpleNamespace(  # what diablo_cli.distributed reads; accelerate unwraps an engine to .module
        distributed_type=DistributedType.DEEPSPEED,
        num_processes=2,
        state=SimpleNamespace(deepspeed_plugin=plugin),
        unwrap_model=lambda engine: engine.module,
    )
    return model.train(), accelerator, plugin


def initialize(model, accelerator, plugin):
    """configure_sharding, then deepspeed.initialize with the torch AdamW built before it, as accelerate does."""
    import deepspeed

    from diablo_cli.distributed import configure_sharding

    notes = configure_sharding(accelerator, model, micro_batch_size=MICRO_BATCH, max_grad_norm=None)
    ds_config = {**plugin.deepspeed_config, "train_batch_size": MICRO_BATCH * 2, "zero_allow_untested_optimizer": True}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LEARNING_RATE)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    return engine, notes


def run(rank: int, stage: int) -> dict:
    from conftest import randomize_adapters, tiny_llama
    from deepspeed.utils import safe_get_full_grad

    import diablo_cli
    from diablo_cli.distributed import backward, full_optimizer_state, gather_trainable, load_full_optimizer_state

    engine_name = f"deepspeed-zero{stage}"
    model, accelerator, plugin = build(stage)
    unsharded = diablo_cli.attach_diablo(tiny_llama(dtype=torch.bfloat16), diablo_config())
    randomize_adapters(unsharded)
    want = unsharded_steps(unsharded, weight_decay=0.01) if rank == 0 else None

    engine, notes = initialize(model, accelerator, plugin)
    q_proj = engine.module.model.layers[0].self_attn.q_proj
    dtypes = {"blocks": str(q_proj.diablo_blocks.dtype), "base": str(q_proj.base.weight.dtype)}
    loss = engine(input_ids=batch(rank), labels=batch(rank)).loss
    engine.backward(loss)
    grads = {n: safe_get_full_grad(p).clone() for n, p in engine.module.named_parameters() if p.requires_grad}
    engine.step()
    after = gather_trainable(accelerator, engine, engine_name)  # what train.py saves
    state = full_optimizer_state(accelerator, engine, None, engine_name)  # what its checkpoints hold
    state_worst = optimizer_state_difference(state, want["optimizer"]) if rank == 0 else None
    step = engine(input_ids=batch(rank), labels=batch(rank)).loss  # the run going on uninterrupted
    backward(accelerator, engine, step, window_end=True, engine=engine_name)
    continued = gather_trainable(accelerator, engine, engine_name)
    # resume: a fresh run takes the checkpoint's weights before initialize and its optimizer state after, then steps
    fresh, accelerator, plugin = build(stage)
    fresh.load_state_dict(after, strict=False)
    engine, _ = initialize(fresh, accelerator, plugin)
    load_full_optimizer_state(accelerator, engine, None, engine_name, state)
    backward(
        accelerator, engine, engine(input_ids=batch(rank), labels=batch(rank)).loss, window_end=True, engine=engine_name
    )
    second = gather_trainable(accelerator, engine, engine_name)
    if rank != 0:
        return {}
    return {
        "notes": notes,
        "dtypes": dtypes,
        "loss": loss.item(),
        "reference_loss": want["loss"],
        "grads": worst_relative(grads, want["grads"]),
        "after_step": worst_relative(after, want["after"]),
        "optimizer_state": state_worst,
        "resumed_step": worst_relative(second, want["second"]),
        "resumed_vs_continued": worst_relative(second, continued),
    }


def worker(rank: int, results: str, port: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    import deepspeed
    import torch.distributed as dist

    deepspeed.init_distributed(dist_backend="gloo")
    for stage in (2, 3):
        try:
            outcome = run(rank, stage)
        except Exception as err:  # recorded for the test, which skips with the exact error
            outcome = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()[-3000:]}
        if rank == 0:
            (Path(results) / f"zero{stage}.json").write_text(json.dumps(outcome, indent=1))
        dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    results_dir, port = sys.argv[1:3]
    mp.spawn(worker, args=(results_dir, port), nprocs=2)
