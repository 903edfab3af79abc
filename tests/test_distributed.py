"""Sharding engines: the example accelerate configs, the kernel each engine allows, the FSDP wrap policy that keeps
fp32 DiaBlo blocks and bf16 frozen weights in separate flat parameters, configure_sharding's settings, and real
FSDP1/FSDP2 on CPU (2 processes, gloo) against the same step in one process."""

from __future__ import annotations

import functools
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
from accelerate.utils import DeepSpeedPlugin, DistributedType, FullyShardedDataParallelPlugin
from conftest import tiny_llama
from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

import diablo_cli
from diablo_cli.adapter.model import adapted_layers
from diablo_cli.distributed import (
    configure_sharding,
    flat_parameter_groups,
    fsdp_wrap_policy,
    sharding_engine,
    training_kernel,
    transformer_layer_classes,
)
from diablo_cli.errors import DiaBloError
from diablo_cli.launch import ACCELERATE_CONFIGS, accelerate_config_path

ROOT = Path(__file__).parents[1]
FP32_TRAINABLE = (torch.float32, True)
BF16_FROZEN = (torch.bfloat16, False)


def diablo_llama(kernel: str = "blocks") -> torch.nn.Module:
    model = tiny_llama(dtype=torch.bfloat16)
    return diablo_cli.attach_diablo(model, diablo_cli.DiaBloConfig(blocks=4, target_modules="QKVOGUD", kernel=kernel))


def fake_accelerator(kind: DistributedType, *, fsdp=None, deepspeed=None, fsdp2: bool = False, processes: int = 2):
    """The attributes configure_sharding reads; accelerate itself never selects FSDP or DeepSpeed on a CPU."""
    state = SimpleNamespace(fsdp_plugin=fsdp, deepspeed_plugin=deepspeed)
    return SimpleNamespace(distributed_type=kind, is_fsdp2=fsdp2, num_processes=processes, state=state)


# --- the example configs -------------------------------------------------------------------------------------

CONFIG_FILES = sorted(ACCELERATE_CONFIGS.glob("*.yaml"))


def test_the_example_configs_are_all_there():
    assert {path.stem for path in CONFIG_FILES} == {"ddp", "fsdp", "fsdp2", "deepspeed-zero2", "deepspeed-zero3"}
    assert (ACCELERATE_CONFIGS / "README.md").is_file()


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda path: path.stem)
def test_every_example_config_loads_with_accelerates_own_loader(path):
    config = load_config_from_file(str(path))
    assert isinstance(config, ClusterConfig)
    assert config.num_machines == 1 and config.num_processes > 1 and not config.use_cpu
    expected = {
        "ddp": DistributedType.MULTI_GPU,
        "fsdp": DistributedType.FSDP,
        "fsdp2": DistributedType.FSDP,
        "deepspeed-zero2": DistributedType.DEEPSPEED,
        "deepspeed-zero3": DistributedType.DEEPSPEED,
    }
    assert config.distributed_type == expected[path.stem]


def test_fsdp_configs_hold_the_settings_diablo_relies_on():
    fsdp = load_config_from_file(str(ACCELERATE_CONFIGS / "fsdp.yaml")).fsdp_config
    assert fsdp["fsdp_version"] == 1
    assert fsdp["fsdp_use_orig_params"] is True
    assert fsdp["fsdp_state_dict_type"] == "FULL_STATE_DICT"
    assert fsdp["fsdp_cpu_ram_efficient_loading"] is True and fsdp["fsdp_sync_module_states"] is True
    assert fsdp["fsdp_activation_checkpointing"] is False
    fsdp2 = load_config_from_file(str(ACCELERATE_CONFIGS / "fsdp2.yaml")).fsdp_config
    assert fsdp2["fsdp_version"] == 2 and fsdp2["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"


def test_deepspeed_configs_hold_the_settings_diablo_relies_on():
    zero2 = load_config_from_file(str(ACCELERATE_CONFIGS / "deepspeed-zero2.yaml")).deepspeed_config
    assert zero2["zero_stage"] == 2
    zero3 = load_config_from_file(str(ACCELERATE_CONFIGS / "deepspeed-zero3.yaml")).deepspeed_config
    assert zero3["zero_stage"] == 3 and zero3["zero3_init_flag"] is True
    assert zero3["offload_optimizer_device"] == zero3["offload_param_device"] == "none"
    # the batch size, accumulation and clipping come from the recipe (configure_sharding), not from here
    assert not {"gradient_accumulation_steps", "gradient_clipping"} & (set(zero2) | set(zero3))


def launcher_environment(name: str) -> dict[str, str]:
    """The environment `accelerate launch --config_file configs/accelerate/NAME.yaml` gives each process."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    arguments = ["--config_file", str(accelerate_config_path(name)), "-m", "diablo_cli", "train", "recipe.yaml"]
    args, defaults, _ = _validate_launch_command(launch_command_parser().parse_args(arguments))
    if args.use_deepspeed:
        args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)
        environment = prepare_deepspeed_cmd_env(args)[1]
    else:
        environment = prepare_multi_gpu_env(args)
    return {k: v for k, v in environment.items() if k.startswith(("FSDP_", "ACCELERATE_"))}


@pytest.mark.parametrize("name", ["fsdp", "fsdp2"])
def test_launching_an_fsdp_config_gives_the_plugin_configure_sharding_completes(name, monkeypatch):
    environment = launcher_environment(name)
    assert environment["ACCELERATE_USE_FSDP"] == "true"
    assert environment["FSDP_CPU_RAM_EFFICIENT_LOADING"] == environment["FSDP_SYNC_MODULE_STATES"] == "true"
    assert environment["FSDP_STATE_DICT_TYPE"] == "FULL_STATE_DICT"
    # accelerate's plugin asks the GPU for sync_module_states; on this CPU build it without
    environment.update(FSDP_CPU_RAM_EFFICIENT_LOADING="false", FSDP_SYNC_MODULE_STATES="false")
    for key, value in environment.items():
        monkeypatch.setenv(key, value)
    plugin = FullyShardedDataParallelPlugin()
    plugin.set_mixed_precision(environment["ACCELERATE_MIXED_PRECISION"])  # what AcceleratorState does
    fsdp2 = name == "fsdp2"
    model = diablo_llama(kernel="auto")
    notes = configure_sharding(fake_accelerator(DistributedType.FSDP, fsdp=plugin, fsdp2=fsdp2), model)
    assert plugin.mixed_precision_policy is None  # no casting of the fp32 blocks
    assert {layer.kernel for layer in adapted_layers(model).values()} == {"blocks"}
    if fsdp2:
        assert plugin.auto_wrap_policy is transformer_auto_wrap_policy
        assert plugin.transformer_cls_names_to_wrap == ["LlamaDecoderLayer"]
    else:
        assert plugin.use_orig_params is True
        assert all(len(kinds) == 1 for kinds in flat_parameter_groups(model, plugin.auto_wrap_policy).values())
    assert notes[0] == "kernel: blocks on all 21 DiaBlo layers under fsdp"


@pytest.mark.parametrize("name", ["deepspeed-zero2", "deepspeed-zero3"])
def test_launching_a_deepspeed_config_gives_the_plugin_configure_sharding_completes(name, monkeypatch):
    environment = launcher_environment(name)
    assert environment["ACCELERATE_USE_DEEPSPEED"] == "true"
    for key, value in environment.items():
        monkeypatch.setenv(key, value)
    plugin = DeepSpeedPlugin()
    plugin.set_mixed_precision("bf16")  # a recipe with training.mixed_precision: bf16
    stage = int(name[-1])
    assert plugin.zero_stage == stage and plugin.zero3_init_flag == (stage == 3)
    accelerator = fake_accelerator(DistributedType.DEEPSPEED, deepspeed=plugin)
    notes = configure_sharding(
        accelerator, diablo_llama(), micro_batch_size=4, gradient_accumulation_steps=8, max_grad_norm=1.0
    )
    config = plugin.deepspeed_config
    assert config["train_micro_batch_size_per_gpu"] == 4 and config["gradient_accumulation_steps"] == 8
    assert config["gradient_clipping"] == 1.0 and config["train_batch_size"] == "auto"
    assert config["bf16"]["enabled"] is False  # it would cast the fp32 blocks; the base is loaded by now
    assert notes[0] == f"deepspeed: ZeRO-{stage}, 8 micro-batches per step, clips at 1.0"


def test_config_short_names_resolve_and_unknown_names_say_what_exists(tmp_path):
    assert accelerate_config_path("fsdp") == ACCELERATE_CONFIGS / "fsdp.yaml"
    assert accelerate_config_path("zero3") == ACCELERATE_CONFIGS / "deepspeed-zero3.yaml"
    own = tmp_path / "mine.yaml"
    own.write_text("distributed_type: MULTI_GPU\n")
    assert accelerate_config_path(own) == own
    with pytest.raises(DiaBloError, match="one of ddp, deepspeed-zero2, deepspeed-zero3, fsdp, fsdp2, zero2, zero3"):
        accelerate_config_path("zero4")


# --- which engine, which kernel ---------------------------------------------------------------------------------


def test_a_plain_single_process_accelerator_is_no_sharding():
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    try:
        assert sharding_engine(Accelerator(cpu=True)) == "none"
    finally:
        AcceleratorState._reset_state(True)


@pytest.mark.parametrize(
    ("kind", "stage", "engine"),
    [
        (DistributedType.NO, None, "none"),
        (DistributedType.MULTI_CPU, None, "ddp"),
        (DistributedType.MULTI_GPU, None, "ddp"),
        (DistributedType.FSDP, None, "fsdp"),
        (DistributedType.DEEPSPEED, 2, "deepspeed-zero2"),
        (DistributedType.DEEPSPEED, 3, "deepspeed-zero3"),
    ],
)
def test_sharding_engine_names_what_accelerate_was_launched_with(kind, stage, engine):
    plugin = SimpleNamespace(zero_stage=stage)
    assert sharding_engine(fake_accelerator(kind, deepspeed=plugin)) == engine


def test_engines_diablo_does_not_drive_are_refused():
    with pytest.raises(DiaBloError, match="one process, DDP, FSDP or DeepSpeed"):
        sharding_engine(fake_accelerator(DistributedType.XLA))


@pytest.mark.parametrize(
    ("engine", "requested", "kernel", "changed"),
    [
        ("none", "auto", "auto", False),
        ("none", "fold", "fold", False),
        ("ddp", "auto", "auto", False),
        ("ddp", "fold", "fold", False),
        ("fsdp", "auto", "blocks", True),
        ("fsdp", "blocks", "blocks", False),
        ("deepspeed-zero2", "auto", "blocks", True),
        ("deepspeed-zero3", "auto", "blocks", True),
        ("deepspeed-zero3", "blocks", "blocks", False),
    ],
)
def test_training_kernel_table(engine, requested, kernel, changed):
    chosen, reason = training_kernel(engine, requested)
    assert chosen == kernel
    assert (reason is not None) == changed
    if changed:
        assert reason.startswith("adapter.kernel: auto → blocks under " + engine)


@pytest.mark.parametrize("engine", ["fsdp", "deepspeed-zero2", "deepspeed-zero3"])
def test_an_explicit_fold_kernel_under_a_sharding_engine_is_a_one_line_error(engine):
    with pytest.raises(DiaBloError, match=r"^adapter.kernel: fold .* use blocks") as caught:
        training_kernel(engine, "fold")
    assert "\n" not in str(caught.value)


def test_an_unknown_kernel_is_refused_whatever_the_engine():
    with pytest.raises(DiaBloError, match="not a DiaBlo kernel"):
        training_kernel("ddp", "fast")


# --- the FSDP wrap policy -----------------------------------------------------------------------------------------


def test_decoder_layer_classes_come_from_no_split_modules_or_the_repeated_blocks():
    model = diablo_llama()
    assert [cls.__name__ for cls in transformer_layer_classes(model)] == ["LlamaDecoderLayer"]
    model._no_split_modules = None
    assert [cls.__name__ for cls in transformer_layer_classes(model)] == ["LlamaDecoderLayer"]


def test_wrapping_whole_decoder_layers_would_mix_fp32_blocks_with_bf16_weights():
    """The problem is real: FSDP1 refuses such a unit ("Must flatten tensors with uniform dtype")."""
    model = diablo_llama()
    layers = set(transformer_layer_classes(model))
    naive = functools.partial(transformer_auto_wrap_policy, transformer_layer_cls=layers)
    groups = flat_parameter_groups(model, naive)
    assert groups["model.layers.0"] == {FP32_TRAINABLE, BF16_FROZEN}
    assert sum(len(kinds) > 1 for kinds in groups.values()) == 3


def test_wrapping_only_the_frozen_bases_still_leaves_the_blocks_beside_bf16_norms():
    model = diablo_llama()
    bases = {layer.base for layer in adapted_layers(model).values()}
    layers = tuple(transformer_layer_classes(model))
    from torch.distributed.fsdp.wrap import lambda_auto_wrap_policy

    policy = functools.partial(lambda_auto_wrap_policy, lambda_fn=lambda m: isinstance(m, layers) or m in bases)
    assert flat_parameter_groups(model, policy)["model.layers.0"] == {FP32_TRAINABLE, BF16_FROZEN}


def test_diablo_policy_gives_every_unit_one_dtype_and_one_requires_grad():
    model = diablo_llama()
    groups = flat_parameter_groups(model, fsdp_wrap_policy(model))
    assert all(len(kinds) == 1 for kinds in groups.values())
    assert len(groups) == 1 + 3 + 2 * 21  # root, decoder layers, each DiaBlo layer's blocks and its base
    assert groups["model.layers.0.self_attn.q_proj"] == {FP32_TRAINABLE}
    assert groups["model.layers.0.self_attn.q_proj.base"] == {BF16_FROZEN}
    assert groups["model.layers.0"] == {BF16_FROZEN}  # the norms
    assert groups[""] == {BF16_FROZEN}  # embeddings, final norm, lm_head


def test_diablo_policy_splits_off_a_module_kept_in_another_dtype():
    model = tiny_llama(dtype=torch.bfloat16)
    diablo_cli.attach_diablo(model, diablo_cli.DiaBloConfig(blocks=4, target_modules="QKVOGD", kernel="blocks"))
    model.model.layers[1].input_layernorm.float()  # as a model's _keep_in_fp32_modules would
    groups = flat_parameter_groups(model, fsdp_wrap_policy(model))
    assert all(len(kinds) == 1 for kinds in groups.values())
    assert groups["model.layers.1.input_layernorm"] == {(torch.float32, False)}
    assert "model.layers.1.mlp.up_proj" not in groups  # an untargeted bf16 linear stays in its layer's unit


def test_the_policy_follows_fsdps_callable_protocol():
    model = diablo_llama()
    policy = fsdp_wrap_policy(model)
    q_proj = model.model.layers[0].self_attn.q_proj
    assert policy(module=q_proj, recurse=False, nonwrapped_numel=0)
    assert policy(module=q_proj.base, recurse=False, nonwrapped_numel=0)
    assert not policy(module=model.model.layers[0].input_layernorm, recurse=False, nonwrapped_numel=0)
    assert policy(module=model, recurse=True, nonwrapped_numel=0)  # always descends


# --- configure_sharding ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", [DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU])
def test_one_process_and_ddp_change_nothing(kind):
    model = diablo_llama(kernel="auto")
    assert configure_sharding(fake_accelerator(kind), model, micro_batch_size=4) == []
    assert {layer.kernel for layer in adapted_layers(model).values()} == {"auto"}


def test_fsdp1_gets_the_policy_original_parameters_and_no_casting():
    plugin = FullyShardedDataParallelPlugin(fsdp_version=1, activation_checkpointing=True)
    plugin.set_mixed_precision("bf16")
    model = diablo_llama(kernel="auto")
    notes = configure_sharding(fake_accelerator(DistributedType.FSDP, fsdp=plugin), model)
    assert plugin.use_orig_params is True and plugin.mixed_precision_policy is None
    assert plugin.activation_checkpointing is False
    assert plugin.auto_wrap_policy(module=model.model.layers[0].mlp.down_proj.base, recurse=False, nonwrapped_numel=0)
    assert notes == [
        "kernel: blocks on all 21 DiaBlo layers under fsdp",
        "fsdp: 46 shard units, each of one dtype (decoder layers, with trainable adapters and frozen weights in units "
        "of their own); use_orig_params on",
        "fsdp: activation checkpointing off; set model.gradient_checkpointing in the recipe instead",
        "fsdp: parameter casting to bfloat16 off, so the DiaBlo blocks and their gradients stay fp32; the base runs "
        "in its load dtype (model.dtype), autocast still follows training.mixed_precision",
    ]


def test_fsdp_without_mixed_precision_leaves_the_precision_alone():
    plugin = FullyShardedDataParallelPlugin(fsdp_version=1)
    notes = configure_sharding(fake_accelerator(DistributedType.FSDP, fsdp=plugin), diablo_llama())
    assert plugin.mixed_precision_policy is None
    assert not any("casting" in note for note in notes)
    assert not any(note.startswith("kernel:") for note in notes)  # attached with blocks already


def test_fsdp_refuses_an_explicit_fold_kernel():
    plugin = FullyShardedDataParallelPlugin(fsdp_version=1)
    with pytest.raises(DiaBloError, match=r"adapter\.kernel: fold"):
        configure_sharding(fake_accelerator(DistributedType.FSDP, fsdp=plugin), diablo_llama(kernel="fold"))


def test_fsdp1_refuses_a_module_whose_own_parameters_mix_dtypes():
    plugin = FullyShardedDataParallelPlugin(fsdp_version=1)
    model = diablo_llama()
    norm = model.model.layers[0].post_attention_layernorm
    norm.register_parameter("scale", torch.nn.Parameter(torch.ones(1)))  # fp32 beside its bf16 weight
    with pytest.raises(DiaBloError, match=r"FSDP cannot shard model.layers.0.post_attention_layernorm: .* mix"):
        configure_sharding(fake_accelerator(DistributedType.FSDP, fsdp=plugin), model)


def test_fsdp2_wraps_decoder_layers_by_class_name():
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2)
    model = diablo_llama()
    notes = configure_sharding(fake_accelerator(DistributedType.FSDP, fsdp=plugin, fsdp2=True), model)
    assert plugin.auto_wrap_policy is transformer_auto_wrap_policy
    assert plugin.transformer_cls_names_to_wrap == ["LlamaDecoderLayer"]
    assert notes == ["fsdp2: one shard group per LlamaDecoderLayer; fp32 blocks share it with the frozen weights"]


def test_deepspeed_keeps_the_blocks_fp32_and_takes_the_recipes_step_settings():
    plugin = DeepSpeedPlugin(zero_stage=2)
    plugin.set_mixed_precision("bf16")
    model = diablo_llama(kernel="auto")
    notes = configure_sharding(
        fake_accelerator(DistributedType.DEEPSPEED, deepspeed=plugin),
        model,
        micro_batch_size=2,
        gradient_accumulation_steps=4,
        max_grad_norm=None,
    )
    config = plugin.deepspeed_config
    assert config["bf16"]["enabled"] is False and config["fp16"]["enabled"] is False
    assert config["gradient_clipping"] == 0.0 and plugin.gradient_clipping == 0.0
    assert config["gradient_accumulation_steps"] == plugin.gradient_accumulation_steps == 4
    assert notes == [
        "kernel: blocks on all 21 DiaBlo layers under deepspeed-zero2",
        "deepspeed: ZeRO-2, 4 micro-batches per step, does not clip",
        "deepspeed: bf16 mode off, which would cast the fp32 DiaBlo blocks to bf16; the frozen base keeps the dtype "
        "it was loaded in",
    ]


def test_deepspeed_zero3_reports_the_dtype_it_shards_the_base_in():
    plugin = DeepSpeedPlugin(zero_stage=3)
    plugin.set_mixed_precision("no")
    notes = configure_sharding(fake_accelerator(DistributedType.DEEPSPEED, deepspeed=plugin), diablo_llama())
    assert notes == [
        "deepspeed: ZeRO-3, 1 micro-batch per step, does not clip",
        "deepspeed: ZeRO-3 shards the frozen base in bfloat16 (zero.Init builds it in the DeepSpeed config's dtype at "
        "load: bf16 when training.mixed_precision is bf16)",
    ]


def test_deepspeed_optimizer_offload_keeps_torchs_adamw():
    plugin = DeepSpeedPlugin(zero_stage=3, offload_optimizer_device="cpu")
    notes = configure_sharding(fake_accelerator(DistributedType.DEEPSPEED, deepspeed=plugin), diablo_llama())
    assert plugin.deepspeed_config["zero_force_ds_cpu_optimizer"] is False
    assert notes[-1] == "deepspeed: optimizer state offloaded to cpu with torch AdamW"


# --- real FSDP on CPU -------------------------------------------------------------------------------------------------


def run_rank_script(script: str, results: Path, timeout: int, **environment: str) -> dict[str, dict]:
    """Run tests/data/SCRIPT (it spawns 2 processes over gloo on a free port) and read the RESULTS/<variant>.json
    that its rank 0 writes."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    done = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "data" / script), str(results), port],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **environment},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return {path.stem: json.loads(path.read_text()) for path in results.glob("*.json")}


@pytest.fixture(scope="module")
def fsdp_results(tmp_path_factory) -> dict[str, dict]:
    """tests/data/fsdp_ranks.py, once: FSDP1 and FSDP2 (about 15 s)."""
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available in this torch build")
    return run_rank_script("fsdp_ranks.py", tmp_path_factory.mktemp("fsdp"), timeout=240)


def outcome(results: dict[str, dict], variant: str) -> dict:
    found = results[variant]
    if "error" in found:
        pytest.skip(f"{variant} cannot run on CPU/gloo with torch {torch.__version__}: {found['error']}")
    return found


def test_fsdp1_on_cpu_gives_the_unsharded_gradients_and_step(fsdp_results):
    found = outcome(fsdp_results, "fsdp1")
    assert found["kernels"] == ["blocks"]
    assert found["grads"]["count"] == 21 and not found["grads"]["missing"]
    assert found["grads"]["worst_relative_difference"] < 1e-5
    assert found["after_step"]["worst_relative_difference"] < 1e-5  # AdamW built before wrapping still steps
    assert found["norm"] == pytest.approx(found["reference_norm"], rel=1e-5)
    model = diablo_llama()
    assert found["units"] == len(flat_parameter_groups(model, fsdp_wrap_policy(model)))  # the simulation is right
    assert found["units_accelerate_would_upcast"] == 0  # the frozen bf16 units stay bf16 under accelerate


@pytest.mark.parametrize("variant", ["fsdp1", "fsdp2"])
def test_fsdp_checkpoints_hold_the_unsharded_optimizer_state_and_resume_exactly(fsdp_results, variant):
    """train.py's checkpoint path under FSDP: gather_trainable and full_optimizer_state give exactly what one
    unsharded process holds after a step (so the checkpoint is the one-process format); a fresh sharded run that
    loads them takes exactly the unsharded second step."""
    found = outcome(fsdp_results, variant)
    assert found["optimizer_state"] == 0.0
    assert found["resumed_step"]["count"] == 21 and found["resumed_step"]["worst_relative_difference"] == 0.0


def test_fsdp1_gradient_norm_needs_all_shards(fsdp_results):
    """Why train.py must hand FSDP1 all the model's parameters to clip: the trainable subset's norm on one rank is
    the norm of that rank's shard only."""
    found = outcome(fsdp_results, "fsdp1")
    for local in found["local_subset_norms"]:
        assert local < 0.9 * found["reference_norm"]


def test_fsdp2_on_cpu_through_accelerates_preparation_gives_the_unsharded_step(fsdp_results):
    found = outcome(fsdp_results, "fsdp2")
    assert found["sharded_parameters"] > 0 and found["block_dtypes"] == ["torch.float32"]
    assert found["grads"]["worst_relative_difference"] < 1e-5
    assert found["after_step"]["worst_relative_difference"] < 1e-5
    assert found["norm"] == pytest.approx(found["reference_norm"], rel=1e-5)


def test_fsdp1_rank0_loading_with_sync_module_states(fsdp_results):
    """cpu_ram_efficient_loading: rank 1 builds its model on the meta device and FSDP1 broadcasts rank 0's weights.
    FSDP1's sync_module_states needs GPU tensors, so on a CPU machine this is recorded and skipped."""
    found = outcome(fsdp_results, "fsdp1-rank0-loading")
    assert found["grads"]["worst_relative_difference"] < 1e-5


# --- real DeepSpeed on CPU (only where DeepSpeed is installed; it is not a dependency) ----------------------------


@pytest.fixture(scope="module")
def deepspeed_results(tmp_path_factory) -> dict[str, dict]:
    """tests/data/deepspeed_ranks.py, once: ZeRO-2 and ZeRO-3 on DeepSpeed's CPU accelerator (about 30 s)."""
    pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (it is optional)")
    return run_rank_script(
        "deepspeed_ranks.py", tmp_path_factory.mktemp("deepspeed"), timeout=300, DS_ACCELERATOR="cpu"
    )


def test_deepspeed_zero2_on_cpu_trains_fp32_blocks_exactly_as_one_process(deepspeed_results):
    found = outcome(deepspeed_results, "zero2")
    assert found["dtypes"] == {"blocks": "torch.float32", "base": "torch.bfloat16"}
    assert found["loss"] == found["reference_loss"]
    assert found["grads"] < 1e-5 and found["after_step"] < 1e-5
    # checkpoints: the one-process optimizer state, and a resumed run steps exactly as the uninterrupted one
    assert found["optimizer_state"] < 1e-6
    assert found["resumed_step"] < 1e-5 and found["resumed_vs_continued"] == 0.0


def test_deepspeed_zero3_on_cpu_keeps_fp32_blocks_beside_a_bf16_base_built_by_zero_init(deepspeed_results):
    found = outcome(deepspeed_results, "zero3")
    assert found["dtypes"] == {"blocks": "torch.float32", "base": "torch.bfloat16"}
    assert found["loss"] == found["reference_loss"]
    # ZeRO-3 computes the bf16 base's products in its own order: bf16 rounding, not a different gradient (with an
    # fp32 base the same run agrees to 1e-6)
    assert found["grads"] < 3e-2
    assert found["optimizer_state"] < 5e-2  # the same rounding, carried into AdamW's moments
    assert found["resumed_vs_continued"] == 0.0  # resuming from the gathered checkpoint changes nothing
