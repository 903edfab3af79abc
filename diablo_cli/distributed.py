"""Fitting a DiaBlo model to the sharding engine accelerate was launched with: DDP, FSDP or DeepSpeed ZeRO.

DDP needs nothing: every process holds the whole model. The sharding engines do need care, for two reasons
particular to DiaBlo. (1) The ``fold`` kernel writes the blocks into the frozen base weight, which FSDP and
ZeRO-3 hold as shards of flat buffers, so sharded training takes the ``blocks`` kernel. (2) The adapter is fp32
beside a frozen base that is usually bf16, while FSDP (version 1) flattens each wrapped unit's parameters into
one tensor of one dtype, and DeepSpeed's 16-bit modes cast every parameter, the adapter included; left alone,
the one refuses the model and the other rounds the adapter. ``configure_sharding`` sets the engine up before
``accelerator.prepare``.
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Callable

import torch
from torch import nn

from .adapter.kernels import check_kernel
from .adapter.model import adapted_layers, bare_name
from .errors import DiaBloError

Signature = tuple[torch.dtype, bool]
"""What FSDP1 needs to be uniform inside one flat parameter: (dtype, requires_grad)."""


def _deepspeed_launch() -> bool:
    import os

    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def accelerator_on_cpu() -> bool:
    """Whether to build the Accelerator with ``cpu=True``: on a machine without CUDA, except under a DeepSpeed
    launch, which accelerate starts only with ``cpu=False`` (DeepSpeed then runs on its own CPU accelerator,
    ``DS_ACCELERATOR=cpu``, over gloo: how the tests run ZeRO without a GPU)."""
    return not torch.cuda.is_available() and not _deepspeed_launch()


def join_cpu_processes() -> None:
    """Call before building the Accelerator. Under a DeepSpeed launch without CUDA, ``Accelerator(cpu=False)``
    alone leaves every launched process in a group of its own, each its own main process (two ranks then claim
    the same output folder); accelerate's process state built with ``cpu=True`` first joins them over gloo, and
    the Accelerator keeps that group. (transformers' TrainingArguments used to do this as a side effect.)"""
    if torch.cuda.is_available() or not _deepspeed_launch():
        return
    from accelerate import PartialState

    PartialState(cpu=True)


def sharding_engine(accelerator) -> str:
    """How the model is spread over processes: ``none`` (one process), ``ddp`` (a full copy per process),
    ``fsdp``, or ``deepspeed-zero0`` … ``deepspeed-zero3``. Everything else in this module keys on it."""
    from accelerate.utils import DistributedType

    kind = accelerator.distributed_type
    if kind == DistributedType.FSDP:
        return "fsdp"
    if kind == DistributedType.DEEPSPEED:
        return f"deepspeed-zero{int(accelerator.state.deepspeed_plugin.zero_stage)}"
    if kind == DistributedType.NO:
        return "none"
    if kind.value.startswith("MULTI_"):
        return "ddp"
    raise DiaBloError(f"diablo train runs on one process, DDP, FSDP or DeepSpeed; accelerate was started with {kind}")


def training_kernel(engine: str, requested: str) -> tuple[str, str | None]:
    """The adapter kernel to train with under ``engine``, and a one-line reason when it differs from ``requested``.

    ``fold`` adds the blocks into the frozen base weight in place; FSDP and ZeRO-3 keep that weight as shards of
    a flat buffer (and ZeRO-1/2 keep the adapter itself in one), so sharded engines train with ``blocks``, which
    never touches the base weight.
    """
    check_kernel(requested)
    if engine in ("none", "ddp") or requested == "blocks":
        return requested, None
    if requested == "fold":
        raise DiaBloError(
            f"adapter.kernel: fold writes the blocks into the frozen base weights, which {engine} shards across "
            "processes; use blocks (or auto, which picks blocks here)"
        )
    return "blocks", f"adapter.kernel: auto → blocks under {engine} (fold would write into sharded frozen weights)"


def transformer_layer_classes(model: nn.Module) -> list[type[nn.Module]]:
    """The model's repeated block classes (its decoder layers): FSDP's natural unit, one all-gather per layer.

    Taken from transformers' ``_no_split_modules`` where those classes occur in the model, else the class of the
    longest ``ModuleList`` whose items are all of one class.
    """
    names = set(getattr(model, "_no_split_modules", None) or ())
    classes = {type(module) for module in model.modules() if type(module).__name__ in names}
    if not classes:
        stacks = [
            stack
            for stack in model.modules()
            if isinstance(stack, nn.ModuleList) and len(stack) > 1 and len({type(item) for item in stack}) == 1
        ]
        if stacks:
            classes = {type(max(stacks, key=len)[0])}
    return sorted(classes, key=lambda cls: cls.__name__)


def fsdp_wrap_policy(model: nn.Module) -> Callable[..., bool]:
    """An FSDP auto-wrap policy under which every unit holds parameters of one dtype and one requires_grad.

    FSDP1 flattens each unit's parameters into one flat parameter of one dtype; a decoder layer wrapped whole
    would hold fp32 DiaBlo blocks beside bf16 frozen weights and FSDP refuses it ("Must flatten tensors with
    uniform dtype"). So: each decoder layer is a unit (for per-layer sharding), each DiaBlo layer is a unit
    holding only its blocks, and each DiaBlo layer's frozen base is a unit of its own; the layer's remaining
    frozen parameters (norms, untargeted linears) stay with the decoder layer. Any other module whose own
    parameters differ from the rest of its unit (a norm kept in fp32 in a bf16 model) is split off too.
    The result is a classic FSDP1 ``lambda_auto_wrap_policy``. accelerate's FSDP2 path drops custom callables
    (it applies only its transformer/size policies), which is why configure_sharding gives FSDP2 class names.
    """
    from torch.distributed.fsdp.wrap import lambda_auto_wrap_policy

    layer_classes = tuple(transformer_layer_classes(model))
    units = {module for module in model.modules() if layer_classes and isinstance(module, layer_classes)}
    for layer in adapted_layers(model).values():
        units |= {layer, layer.base}
    units = _split_mixed_units(model, units)
    return functools.partial(lambda_auto_wrap_policy, lambda_fn=units.__contains__)


def flat_parameter_groups(model: nn.Module, policy: Callable[..., bool]) -> dict[str, set[Signature]]:
    """FSDP1's auto-wrapping simulated on the module tree, without a process group: for each unit that would hold
    parameters (by module path, ``""`` for the root), the set of (dtype, requires_grad) of those parameters.

    FSDP1 accepts a unit only when its set has one dtype (and, with ``use_orig_params=False``, one
    requires_grad), so this checks a policy on CPU before any process starts. ``policy`` is a classic FSDP1
    callable (``module, recurse, nonwrapped_numel``), e.g. :func:`fsdp_wrap_policy` or a
    ``transformer_auto_wrap_policy`` partial; the recursion follows ``torch.distributed.fsdp.wrap._recursive_wrap``.
    """
    units: list[str] = []

    def visit(path: str, module: nn.Module, root: bool) -> int:  # returns the numel wrapped inside ``module``
        total = sum(p.numel() for p in module.parameters())
        wrapped = 0
        if policy(module=module, recurse=True, nonwrapped_numel=total):
            for name, child in module.named_children():
                wrapped += visit(f"{path}.{name}" if path else name, child, root=False)
        if root or policy(module=module, recurse=False, nonwrapped_numel=total - wrapped):
            units.append(path)
            return total
        return wrapped

    visit("", model, root=True)
    groups: dict[str, set[Signature]] = {}
    for name, parameter in model.named_parameters():
        owner = max((unit for unit in units if not unit or name.startswith(unit + ".")), key=len)
        groups.setdefault(owner, set()).add(_signature(parameter))
    return groups


def configure_sharding(
    accelerator,
    model: nn.Module,
    *,
    micro_batch_size: int | None = None,
    gradient_accumulation_steps: int = 1,
    max_grad_norm: float | None = None,
) -> list[str]:
    """Set the launched engine up for this DiaBlo model; call after attaching the adapter, before ``prepare``.

    Returns one line per decision for the user (empty for one process and DDP, where nothing changes). The
    keyword arguments are the recipe's training settings that DeepSpeed must hold in its own config.
    """
    engine = sharding_engine(accelerator)
    if engine in ("none", "ddp"):
        return []
    notes = _blocks_kernel_everywhere(model, engine)
    if engine == "fsdp":
        return notes + _configure_fsdp(accelerator.state.fsdp_plugin, model, fsdp2=bool(accelerator.is_fsdp2))
    return notes + _configure_deepspeed(
        accelerator.state.deepspeed_plugin,
        model,
        micro_batch_size=micro_batch_size,
        gradient_accumulation_steps=gradient_accumulation_steps,
        max_grad_norm=max_grad_norm,
    )


def is_sharded(engine: str) -> bool:
    """Whether ``engine`` spreads trainable state over processes, so that no rank holds it whole by itself."""
    return engine not in ("none", "ddp")


def steps_in_backward(engine: str) -> bool:
    """Whether ``engine`` applies the optimizer step inside the window's last backward (DeepSpeed does), so that
    a loss found non-finite afterwards has already moved the weights."""
    return engine.startswith("deepspeed")


def backward(accelerator, model: nn.Module, loss: torch.Tensor, *, window_end: bool, engine: str) -> None:
    """``accelerator.backward`` for one micro-batch of a window whose loss is already normalised over the window.

    DeepSpeed steps inside its backward at the end of each accumulation window and divides the loss by its
    accumulation count; train.py's loss is already divided by the window's supervised tokens, and its windows can
    be shorter than the count at an epoch's end, so DeepSpeed is told where each window ends and not to divide.
    """
    if not engine.startswith("deepspeed"):
        accelerator.backward(loss)
        return
    model.set_gradient_accumulation_boundary(window_end)
    model.backward(loss, scale_wrt_gas=False)
    if window_end:
        model.step()  # clips (gradient_clipping), steps the optimizer and zeroes the gradients


def clip_gradients(accelerator, model: nn.Module, max_norm: float, engine: str) -> float | None:
    """Clip the trainable gradients to ``max_norm`` and return their norm over all shards.

    FSDP1 computes the norm over its flat shards only when handed every parameter of the wrapped model (the
    trainable subset would give each rank the norm of its own shard); DeepSpeed has clipped inside its step
    already and reports the norm it saw; FSDP2's DTensor gradients and DDP's full ones are clipped as they are.
    """
    if engine.startswith("deepspeed"):
        norm = model.get_global_grad_norm()
        return None if norm is None else float(norm)
    if engine == "fsdp" and not accelerator.is_fsdp2:
        return float(accelerator.clip_grad_norm_(list(model.parameters()), max_norm))
    return float(accelerator.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], max_norm))


def named_trainable(accelerator, model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The trainable parameters by bare-model name, in the order the optimizer holds them (train.py builds it from
    ``model.parameters()`` filtered by ``requires_grad``). Under FSDP1 they are views into the flat parameters:
    look them up again inside ``summon_full_params``."""
    unwrapped = accelerator.unwrap_model(model)
    return [(bare_name(name), p) for name, p in unwrapped.named_parameters() if p.requires_grad]


def trainable_names(accelerator, model: nn.Module) -> list[str]:
    return [name for name, _ in named_trainable(accelerator, model)]


def full_optimizer_state(accelerator, model: nn.Module, optimizer, engine: str) -> dict:
    """The optimizer's state as one unsharded process would hold it: ``{"state": {index: {...}}, "param_groups"}``
    with parameters numbered in the optimizer's order, on CPU, complete on the main process.

    Every process must call it under the sharded engines (they gather collectively). A checkpoint written from it
    does not depend on the engine or the number of processes, so it resumes under any of them.
    """
    if not is_sharded(engine):
        return optimizer.state_dict()
    if engine.startswith("deepspeed"):
        from deepspeed.utils import safe_get_full_optimizer_state

        zero = model.optimizer  # the ZeRO optimizer around the torch optimizer built in train.py
        scalars, element_keys = _zero_state_keys(zero)
        parameters = [p for _, p in named_trainable(accelerator, model)]
        state = {  # empty before the first step, as for a fresh torch optimizer
            index: {
                **{key: value.clone() if isinstance(value, torch.Tensor) else value for key, value in scalars.items()},
                **{key: safe_get_full_optimizer_state(p, key).detach().cpu() for key in element_keys},
            }
            for index, p in enumerate(parameters)
            if element_keys
        }
        groups = [{**_group_settings(group), "params": list(range(len(parameters)))} for group in zero.param_groups]
        return {"state": state, "param_groups": groups[:1]}
    from accelerate.utils import send_to_device
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    # Without cpu_offload: with it, torch 2.13 swaps AdamW's two moments (seen on CPU; not ruled out on GPUs). Every
    # rank then holds the whole state for a moment: 2 × the trainable parameters in fp32, small for an adapter.
    options = StateDictOptions(full_state_dict=True, cpu_offload=False)
    by_name = send_to_device(get_optimizer_state_dict(model, _inner_optimizer(optimizer), options=options), "cpu")
    index = {name: position for position, name in enumerate(trainable_names(accelerator, model))}
    return {
        "state": {index[bare_name(name)]: values for name, values in by_name.get("state", {}).items()},
        "param_groups": [
            {**_group_settings(group), "params": [index[bare_name(n)] for n in group["params"]]}
            for group in by_name.get("param_groups", [])
        ],
    }


def load_full_optimizer_state(accelerator, model: nn.Module, optimizer, engine: str, state_dict: dict) -> None:
    """Put a :func:`full_optimizer_state` (from a checkpoint, on every process) back into the live optimizer,
    each process taking its own shard."""
    if not is_sharded(engine):
        optimizer.load_state_dict(state_dict)
        return
    if engine.startswith("deepspeed"):
        from deepspeed.utils import safe_set_full_optimizer_state

        for group, settings in zip(model.optimizer.param_groups, state_dict["param_groups"], strict=False):
            group.update(_group_settings(settings))  # the learning rate the scheduler had reached, and the rest
        saved = {int(index): values for index, values in state_dict["state"].items()}
        if not saved:
            return
        _prime_zero_state(model.optimizer, saved[min(saved)])
        for index, (_, p) in enumerate(named_trainable(accelerator, model)):
            for key, value in saved[index].items():
                if isinstance(value, torch.Tensor) and value.dim() > 0:
                    safe_set_full_optimizer_state(p, value.to(p.device), key)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    names = trainable_names(accelerator, model)
    by_name = {  # torch.distributed.checkpoint names parameters as the bare model does
        "state": {names[int(i)]: values for i, values in state_dict["state"].items()},
        "param_groups": [
            {**group, "params": [names[int(i)] for i in group["params"]]} for group in state_dict["param_groups"]
        ],
    }
    set_optimizer_state_dict(
        model, _inner_optimizer(optimizer), by_name, options=StateDictOptions(full_state_dict=True)
    )


def _offload_to_cpu(model: nn.Module) -> bool:
    """Whether FSDP1's summon_full_params should gather to CPU (rank 0 only): on GPUs, yes, to spare GPU memory; on
    a CPU device the tensors are there already, and torch 2.13's offloading copy crashes there."""
    return next(model.parameters()).device.type != "cpu"


def _inner_optimizer(optimizer):
    """The torch optimizer inside accelerate's wrapper."""
    return getattr(optimizer, "optimizer", optimizer)


def _group_settings(group: dict) -> dict:
    return {key: value for key, value in group.items() if key != "params"}


def _prime_zero_state(zero, sample: dict) -> None:
    """Give a ZeRO optimizer that has not stepped yet the state entries of ``sample`` (one parameter's saved state):
    zeros per element, the shared values (AdamW's step) as saved, on every flat fp32 partition, and link them to the
    parameters so that DeepSpeed's ``safe_set_full_optimizer_state`` can fill them. torch's optimizers create their
    state lazily at the first step, and DeepSpeed links it only then."""
    partitions = getattr(zero, "fp32_partitioned_groups_flat", None)  # ZeRO-3 puts them in param_groups per step
    if partitions is None:
        partitions = [partition for group in zero.optimizer.param_groups for partition in group["params"]]
    for partition in partitions:
        state = zero.optimizer.state[partition]
        for key, value in sample.items():
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                state.setdefault(key, torch.zeros_like(partition))
            else:
                state[key] = value.clone().to(partition.device) if isinstance(value, torch.Tensor) else value
    if hasattr(zero, "_lazy_init_hp_params_optimizer_state"):  # ZeRO-1/2 map each parameter onto its fragment
        zero._hp_optimizer_states_linked = False
        zero._lazy_init_hp_params_optimizer_state()


def _zero_state_keys(zero) -> tuple[dict, list[str]]:
    """What the torch optimizer inside a ZeRO optimizer keeps per flat partition: the values shared by all its
    elements (AdamW's step) and the names of the per-element tensors (exp_avg, exp_avg_sq)."""
    partitions = list(zero.optimizer.state.values())
    if not partitions:
        return {}, []
    first = partitions[0]
    element_keys = [k for k, v in first.items() if isinstance(v, torch.Tensor) and v.dim() > 0]
    scalars = {k: (v.detach().cpu().clone() if isinstance(v, torch.Tensor) else v) for k, v in first.items()}
    return {k: v for k, v in scalars.items() if k not in element_keys}, element_keys


def gather_trainable(accelerator, model: nn.Module, engine: str) -> dict[str, torch.Tensor]:
    """The whole trainable tensors (the adapter, or every weight for full fine-tuning) on CPU in fp32-as-trained,
    keyed by their bare-model names. Every process must call it (the sharded engines gather collectively); the
    result is complete on the main process.

    Only trainable parameters are gathered: FSDP2 and DeepSpeed gather them one by one; FSDP1 summons the full
    parameters to rank 0's CPU for the duration."""
    if engine.startswith("deepspeed"):
        from deepspeed.utils import safe_get_full_fp32_param

        return {name: safe_get_full_fp32_param(p).detach().cpu() for name, p in named_trainable(accelerator, model)}
    if engine == "fsdp" and not getattr(accelerator, "is_fsdp2", False):
        import torch.distributed as dist
        from torch.distributed.fsdp import FullyShardedDataParallel

        # the parameters are views into the summoned buffers only inside the context: look them up there
        with FullyShardedDataParallel.summon_full_params(
            model, writeback=False, rank0_only=True, offload_to_cpu=_offload_to_cpu(model)
        ):
            named = named_trainable(accelerator, model)
            return {name: p.detach().cpu().clone() for name, p in named} if dist.get_rank() == 0 else {}
    from torch.distributed.tensor import DTensor

    named = named_trainable(accelerator, model)

    return {name: (p.full_tensor() if isinstance(p, DTensor) else p).detach().cpu() for name, p in named}


def _signature(parameter: torch.Tensor) -> Signature:
    return parameter.dtype, parameter.requires_grad


def _unit_of_each_module(model: nn.Module, units: set[nn.Module]) -> dict[nn.Module, nn.Module]:
    """Which unit each module's own parameters land in: the nearest unit among itself and its ancestors."""
    owner: dict[nn.Module, nn.Module] = {}

    def visit(module: nn.Module, unit: nn.Module) -> None:
        unit = module if module in units else unit
        owner[module] = unit
        for child in module.children():
            visit(child, unit)

    visit(model, model)
    return owner


def _split_mixed_units(model: nn.Module, units: set[nn.Module]) -> set[nn.Module]:
    """Make every module whose own parameters disagree with its unit a unit, until no unit mixes signatures.

    A unit's reference signature is that of the parameters its root module holds itself when those agree
    (a DiaBlo layer: its blocks), else the one most of its parameters share. Each round adds modules that
    were not units yet, so it ends.
    """
    units = set(units)
    while True:
        owner = _unit_of_each_module(model, units)
        weight: dict[nn.Module, Counter] = {}
        for module, unit in owner.items():
            for parameter in module.parameters(recurse=False):
                weight.setdefault(unit, Counter())[_signature(parameter)] += parameter.numel()
        reference = {}
        for unit, counts in weight.items():
            own = {_signature(p) for p in unit.parameters(recurse=False)}
            reference[unit] = own.pop() if len(own) == 1 else counts.most_common(1)[0][0]
        misfits = {
            module
            for module, unit in owner.items()
            if module is not unit and any(_signature(p) != reference[unit] for p in module.parameters(recurse=False))
        }
        if not misfits:
            return units
        units |= misfits


def _blocks_kernel_everywhere(model: nn.Module, engine: str) -> list[str]:
    """Safety net for callers that attached with ``auto``: switch the layers to ``blocks`` (``fold`` raises)."""
    layers = list(adapted_layers(model).values())
    switched = 0
    for layer in layers:
        kernel, reason = training_kernel(engine, layer.kernel)
        if reason is not None:
            layer.kernel = kernel
            switched += 1
    return [f"kernel: blocks on all {len(layers)} DiaBlo layers under {engine}"] if switched else []


def _configure_fsdp(plugin, model: nn.Module, *, fsdp2: bool) -> list[str]:
    notes = []
    if fsdp2:
        # accelerate's FSDP2 applies only its named policies (a custom callable is dropped silently), and FSDP2
        # needs one dtype among a unit's *trainable* parameters only: the fp32 blocks are the only trainable ones,
        # so wrapping whole decoder layers is enough.
        from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

        classes = [cls.__name__ for cls in transformer_layer_classes(model)]
        plugin.auto_wrap_policy = transformer_auto_wrap_policy
        plugin.transformer_cls_names_to_wrap = classes
        where = ", ".join(classes) if classes else "the whole model (no repeated layer class found)"
        notes.append(f"fsdp2: one shard group per {where}; fp32 blocks share it with the frozen weights")
    else:
        policy = fsdp_wrap_policy(model)
        groups = flat_parameter_groups(model, policy)
        mixed = {unit: kinds for unit, kinds in groups.items() if len(kinds) > 1}
        if mixed:
            unit, kinds = next(iter(mixed.items()))
            found = ", ".join(f"{str(d).removeprefix('torch.')} {'trainable' if g else 'frozen'}" for d, g in kinds)
            raise DiaBloError(
                f"FSDP cannot shard {unit or 'the model root'}: its own parameters mix {found}; load the base in "
                "one dtype (model.dtype) or use FSDP2 (fsdp_version: 2)"
            )
        plugin.auto_wrap_policy = policy
        plugin.use_orig_params = True  # the optimizer was built before prepare and holds the original parameters
        notes.append(
            f"fsdp: {len(groups)} shard units, each of one dtype (decoder layers, with trainable adapters and frozen "
            "weights in units of their own); use_orig_params on"
        )
        if plugin.activation_checkpointing:
            plugin.activation_checkpointing = False  # accelerate would checkpoint every unit of our policy, nested
            notes.append("fsdp: activation checkpointing off; set model.gradient_checkpointing in the recipe instead")
    precision = plugin.mixed_precision_policy
    cast = getattr(precision, "param_dtype", None)
    if cast is not None and cast != torch.float32:
        plugin.mixed_precision_policy = None
        notes.append(
            f"fsdp: parameter casting to {str(cast).removeprefix('torch.')} off, so the DiaBlo blocks and their "
            "gradients stay fp32; the base runs in its load dtype (model.dtype), autocast still follows "
            "training.mixed_precision"
        )
    return notes


def _configure_deepspeed(
    plugin,
    model: nn.Module,
    *,
    micro_batch_size: int | None,
    gradient_accumulation_steps: int,
    max_grad_norm: float | None,
) -> list[str]:
    config = plugin.deepspeed_config
    stage = int(plugin.zero_stage)
    notes = []
    # train.py prepares the model without a dataloader, so DeepSpeed cannot infer the batch size itself.
    if micro_batch_size is not None:
        config["train_micro_batch_size_per_gpu"] = micro_batch_size
        config["train_batch_size"] = "auto"  # accelerate fills micro × accumulation × processes
    config["gradient_accumulation_steps"] = gradient_accumulation_steps
    plugin.gradient_accumulation_steps = gradient_accumulation_steps
    config["gradient_clipping"] = float(max_grad_norm or 0.0)  # DeepSpeed clips inside its step; 0 turns it off
    plugin.gradient_clipping = config["gradient_clipping"]
    clip = f"clips at {max_grad_norm}" if max_grad_norm else "does not clip"
    micro = f"{gradient_accumulation_steps} micro-batch{'es' if gradient_accumulation_steps != 1 else ''}"
    notes.append(f"deepspeed: ZeRO-{stage}, {micro} per step, {clip}")

    sixteen_bit = [kind for kind in ("bf16", "fp16") if str(config.get(kind, {}).get("enabled")).lower() == "true"]
    for kind in sixteen_bit:  # the base is loaded by now: under ZeRO-3, zero.Init has already built it in 16 bits
        config[kind]["enabled"] = False
    if sixteen_bit:
        notes.append(
            f"deepspeed: {sixteen_bit[0]} mode off, which would cast the fp32 DiaBlo blocks to {sixteen_bit[0]}; "
            "the frozen base keeps the dtype it was loaded in"
        )
    if stage == 3:
        frozen = Counter(p.dtype for p in model.parameters() if not p.requires_grad).most_common(1)
        dtype = str(frozen[0][0]).removeprefix("torch.") if frozen else "none"
        notes.append(
            f"deepspeed: ZeRO-3 shards the frozen base in {dtype} (zero.Init builds it in the DeepSpeed config's "
            "dtype at load: bf16 when training.mixed_precision is bf16)"
        )
    offload = config.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none")
    if str(offload).lower() not in ("none", "null"):
        config["zero_force_ds_cpu_optimizer"] = False  # the adapter's AdamW state is small: torch's AdamW is fine
        notes.append(f"deepspeed: optimizer state offloaded to {offload} with torch AdamW")
    return notes
