"""The recipe's ``adapter.type``: DiaBlo, or a baseline (PEFT LoRA / DoRA, full fine-tuning) on the same loop.

A comparison between methods must differ only in the adapter, so training, checkpoints and evaluation reach a
method through four calls: ``attach`` (returns the model to train), ``report`` (what trains, for the table and
the summary), ``save`` (the run's deliverable, also each checkpoint's) and ``restore`` (a checkpoint's
trainable weights back into the live parameters, which the optimizer holds).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from .adapter import parameter_report, save_adapter
from .adapter.budget import ParameterReport
from .adapter.files import CONFIG_FILE, DAMAGED_ADAPTER_ADVICE, WEIGHTS_FILE, read_adapter_config
from .adapter.model import adapted_layers, attach_diablo, describe_kernel
from .adapter.targets import describe_modules, select_targets, unheld_letters_note
from .atomic import save_pretrained_into
from .errors import AdapterSettingError, DiaBloError
from .models import captured_output, require_extra
from .reading import open_safetensors
from .recipe import AdapterSection, DiaBloAdapter, FullAdapter, LoraAdapter
from .records import TrainableGroup
from .run_folder import ADAPTER_WEIGHTS, read_saved_recipe

logger = logging.getLogger(__name__)

PEFT_WEIGHTS = ADAPTER_WEIGHTS  # PEFT names its weights as DiaBlo does


class TrainingMethod:
    """One way of making a frozen base trainable. Subclasses fill in the four calls."""

    section: AdapterSection
    deliverable = "adapter"  # what the output folder holds

    def attach(self, model: nn.Module, *, kernel: str | None = None) -> nn.Module:
        raise NotImplementedError

    def report(self, model: nn.Module) -> ParameterReport:
        return _count_parameters(model)

    def trainable_groups(self, model: nn.Module) -> list[TrainableGroup] | None:
        """The trainable tensors by kind, for the parameter table; None where ``report``'s rows say it by module."""
        return trainable_groups(model)

    def notes(self, model: nn.Module) -> list[str]:
        """Lines printed under the parameter table."""
        return []

    def save(
        self, model: nn.Module, directory: Path, *, base_model: str, tensors: dict[str, torch.Tensor] | None = None
    ) -> None:
        """Write the deliverable; ``tensors`` (trainable name → whole tensor) stands in for the live parameters
        when a sharded engine holds only pieces of them (see distributed.gather_trainable)."""
        raise NotImplementedError

    def restore(self, model: nn.Module, directory: Path) -> None:
        raise NotImplementedError


@contextmanager
def _keys_under_adapter() -> Iterator[None]:
    """An adapter setting's error names the setting; in a recipe it lives under ``adapter:``."""
    try:
        yield
    except AdapterSettingError as err:
        raise DiaBloError(f"adapter.{err}") from None


@dataclass
class DiaBloMethod(TrainingMethod):
    section: DiaBloAdapter
    unheld: list[str] = field(default_factory=list, init=False)  # the plan's note on letters with no layer

    def attach(self, model: nn.Module, *, kernel: str | None = None) -> nn.Module:
        config = self.section.to_config()
        if kernel is not None:
            config.kernel = kernel
        self.unheld = unheld_letters_note(model, config)
        with _keys_under_adapter():
            return attach_diablo(model, config)

    def report(self, model: nn.Module) -> ParameterReport:
        return parameter_report(model)

    def trainable_groups(self, model: nn.Module) -> list[TrainableGroup] | None:
        return None

    def notes(self, model: nn.Module) -> list[str]:
        return [*self.unheld, describe_kernel(model)]

    def save(
        self, model: nn.Module, directory: Path, *, base_model: str, tensors: dict[str, torch.Tensor] | None = None
    ) -> None:
        save_adapter(model, directory, base_model=base_model, overwrite=True, blocks=tensors)

    def restore(self, model: nn.Module, directory: Path) -> None:
        layers = adapted_layers(model)
        recorded = read_adapter_config(directory)["modules"]
        if set(recorded) != set(layers):
            missing = sorted(set(recorded) ^ set(layers))[0]
            raise DiaBloError(
                f"checkpoint {directory} does not fit this recipe's adapter (first difference: {missing})"
            )
        tensors = load_file(str(directory / WEIGHTS_FILE))
        _copy_into({f"{name}.diablo_blocks": layer.diablo_blocks for name, layer in layers.items()}, tensors, directory)


@dataclass
class PeftLoraMethod(TrainingMethod):
    """LoRA or DoRA through PEFT, on the layers the recipe's ``target_modules`` letters select for DiaBlo.

    PEFT's own adapter files are the deliverable (``PeftModel.from_pretrained`` loads them), written as
    safetensors only."""

    section: LoraAdapter
    unheld: list[str] = field(default_factory=list, init=False)  # the plan's note on letters with no layer

    def attach(self, model: nn.Module, *, kernel: str | None = None) -> nn.Module:
        peft = import_peft()
        selection = self.section.target_config()
        with _keys_under_adapter():
            targets = [target.name for target in select_targets(model, selection)]
        self.unheld = unheld_letters_note(model, selection)
        config = peft.LoraConfig(
            r=self.section.r,
            lora_alpha=self.section.lora_alpha,
            lora_dropout=self.section.dropout,
            target_modules=targets,
            use_dora=self.section.type == "dora",
            bias="none",
            task_type="SEQ_2_SEQ_LM" if getattr(model.config, "is_encoder_decoder", False) else "CAUSAL_LM",
        )
        with quiet_peft():  # may import GPTQModel, which prints a banner
            return peft.get_peft_model(model, config)

    def notes(self, model: nn.Module) -> list[str]:
        names = [name.removeprefix("base_model.model.") for name, module in model.named_modules() if _is_lora(module)]
        return [
            *self.unheld,
            f"{self.section.describe()} through PEFT on {len(names)} layers: {describe_modules(names)}",
        ]

    def save(
        self, model: nn.Module, directory: Path, *, base_model: str, tensors: dict[str, torch.Tensor] | None = None
    ) -> None:
        with quiet_peft():  # PEFT keeps only the adapter's entries of state_dict
            save_pretrained_into(model, directory, prefix=".peft-", safe_serialization=True, state_dict=tensors)

    def restore(self, model: nn.Module, directory: Path) -> None:
        peft = import_peft()
        path = directory / PEFT_WEIGHTS
        if not path.is_file():
            raise DiaBloError(f"checkpoint {directory} has no {PEFT_WEIGHTS} (is it from a LoRA/DoRA run?)")
        result = peft.set_peft_model_state_dict(model, load_file(str(path)))
        missing = [key for key in result.missing_keys if "lora_" in key]
        if missing:
            raise DiaBloError(f"checkpoint {directory} does not fit this recipe's adapter (missing {missing[0]})")


@dataclass
class FullFineTuning(TrainingMethod):
    """Every weight trains; the deliverable is a standalone Hugging Face model folder."""

    section: FullAdapter
    deliverable = "model"

    def attach(self, model: nn.Module, *, kernel: str | None = None) -> nn.Module:
        from .quantize.dequantize import quantized_layers

        if quantized_layers(model):
            raise DiaBloError(
                "adapter.type: full cannot train a quantized base (its packed weights have no gradient); use "
                "diablo, lora or dora on it, or a full-precision base"
            )
        for parameter in model.parameters():
            parameter.requires_grad_(True)
        return model

    def notes(self, model: nn.Module) -> list[str]:
        dtypes = {p.dtype for p in model.parameters()}
        if dtypes & {torch.bfloat16, torch.float16}:
            return [
                "[yellow]warning:[/] full fine-tuning updates 16-bit weights in place, so updates smaller than "
                "their rounding step are lost; set model.dtype: fp32 for an fp32-master baseline"
            ]
        return []

    def save(
        self, model: nn.Module, directory: Path, *, base_model: str, tensors: dict[str, torch.Tensor] | None = None
    ) -> None:
        from transformers.utils import logging as transformers_logging

        shown = transformers_logging.is_progress_bar_enabled()
        transformers_logging.disable_progress_bar()  # a bar per checkpoint would break the step display
        try:
            save_pretrained_into(model, directory, prefix=".model-", safe_serialization=True, state_dict=tensors)
        finally:
            if shown:
                transformers_logging.enable_progress_bar()

    def restore(self, model: nn.Module, directory: Path) -> None:
        files = sorted(directory.glob("model*.safetensors"))
        if not files:
            raise DiaBloError(f"checkpoint {directory} has no model*.safetensors (is it from a full fine-tune?)")
        tensors: dict[str, torch.Tensor] = {}
        for file in files:
            tensors.update(load_file(str(file)))
        live = dict(model.named_parameters())  # tied weights appear once, under the name save_pretrained kept
        _copy_into({name: live[name] for name in tensors if name in live}, tensors, directory)


def training_method(section: AdapterSection) -> TrainingMethod:
    """The method a recipe's ``adapter:`` section asks for."""
    if isinstance(section, DiaBloAdapter):
        return DiaBloMethod(section)
    if isinstance(section, LoraAdapter):
        return PeftLoraMethod(section)
    return FullFineTuning(section)


def import_peft():
    """PEFT, imported quietly: its import pulls in GPTQModel and torchao where installed, which print banners."""
    require_extra("peft", "adapter.type lora / dora (PEFT's LoRA and DoRA)")
    with captured_output(logger):
        import peft
    return peft


@contextmanager
def quiet_peft() -> Iterator[None]:
    """PEFT's calls print GPTQModel's banner on first use and warn about transformers' deprecated names."""
    with captured_output(logger), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        yield


def _is_lora(module: nn.Module) -> bool:
    return hasattr(module, "lora_A") and hasattr(module, "base_layer")


def _count_parameters(model: nn.Module) -> ParameterReport:
    """Trainable versus frozen parameters, each shared tensor counted once."""
    seen: dict[int, nn.Parameter] = {}
    for parameter in model.parameters():
        seen.setdefault(id(parameter), parameter)
    trainable = sum(p.numel() for p in seen.values() if p.requires_grad)
    frozen = sum(p.numel() for p in seen.values() if not p.requires_grad)
    base = frozen or trainable  # full fine-tuning: the whole base trains
    return ParameterReport(trainable=trainable, adapter=trainable, base=base, dead=0, dead_blocks=0, by_module=[])


def trainable_groups(model: nn.Module) -> list[TrainableGroup]:
    """Trainable parameters by kind (q_proj, lora_A, ...), in the order the model holds them."""
    kinds: dict[str, list[nn.Parameter]] = {}
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            kinds.setdefault(_parameter_kind(name), []).append(parameter)
    return [
        TrainableGroup(
            kind,
            len(parameters),
            sorted({"×".join(map(str, p.shape)) for p in parameters}),
            sum(p.numel() for p in parameters),
        )
        for kind, parameters in kinds.items()
    ]


def _parameter_kind(name: str) -> str:
    """``base_model.model.model.layers.3.self_attn.q_proj.lora_A.default.weight`` → ``q_proj.lora_A``."""
    parts = [p for p in name.split(".") if not p.isdigit() and p not in ("default", "weight", "base_model", "model")]
    return ".".join(parts[-2:]) if parts else name


def _copy_into(live: dict[str, torch.Tensor], saved: dict[str, torch.Tensor], directory: Path) -> None:
    """Copy saved tensors into live parameters in place (the optimizer holds references to them)."""
    with torch.no_grad():
        for key, parameter in live.items():
            if key not in saved:
                raise DiaBloError(f"checkpoint {directory} has no tensor {key}; it does not fit this recipe")
            if saved[key].shape != parameter.shape:
                raise DiaBloError(
                    f"checkpoint {directory}: {key} has shape {tuple(saved[key].shape)}, "
                    f"this run's has {tuple(parameter.shape)}"
                )
            parameter.copy_(saved[key])


def peft_adapter_config(directory: Path) -> dict | None:
    """The PEFT config of a ``type: lora | dora`` run folder, or None when the folder holds no PEFT adapter."""
    import json

    path = Path(directory) / CONFIG_FILE  # PEFT's name too
    if not path.is_file():
        return None
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return document if isinstance(document, dict) and "peft_type" in document else None


def recorded_base(directory: Path) -> str | None:
    """The base a saved adapter was trained on: its run's recipe says it best (an alias such as smollm2-135m),
    else what the adapter config recorded."""
    recipe = read_saved_recipe(directory)
    if recipe and recipe.get("base_model"):
        return recipe["base_model"]
    peft_config = peft_adapter_config(directory)
    if peft_config is not None:
        return peft_config.get("base_model_name_or_path")
    return (read_adapter_config(directory).get("base_model") or {}).get("name_or_path")


def attach_saved_adapter(model: nn.Module, directory: Path) -> nn.Module:
    """Put a saved adapter (DiaBlo, or PEFT LoRA/DoRA) on ``model`` for inference; returns the model to run."""
    from .adapter import load_adapter

    if peft_adapter_config(directory) is None:
        return load_adapter(model, directory)
    if not (Path(directory) / PEFT_WEIGHTS).is_file():
        raise DiaBloError(f"{directory} has no {PEFT_WEIGHTS} (only safetensors adapter weights are loaded)")
    with open_safetensors(Path(directory) / PEFT_WEIGHTS, DAMAGED_ADAPTER_ADVICE):
        pass  # PEFT's own load names no file when the weights are damaged
    peft = import_peft()
    with quiet_peft():
        return peft.PeftModel.from_pretrained(model, str(directory), is_trainable=False).eval()


def detach_saved_adapter(model: nn.Module) -> nn.Module:
    """Undo :func:`attach_saved_adapter`: the bare base, as it was."""
    from .adapter import detach_diablo

    if hasattr(model, "peft_config"):
        return model.unload()
    return detach_diablo(model)


def saved_adapter_disabled(model: nn.Module):
    """A context in which ``model`` computes as its bare base, whichever kind of adapter it carries."""
    from .adapter import adapters_disabled

    return model.disable_adapter() if hasattr(model, "peft_config") else adapters_disabled(model)


def is_adapter_parameter(name: str) -> bool:
    """A DiaBlo block tensor or a PEFT LoRA/DoRA weight, by its parameter name."""
    from .adapter.layer import ADAPTER_PARAMETER

    return name.endswith(ADAPTER_PARAMETER) or ".lora_" in name
