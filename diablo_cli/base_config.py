"""What a base checkpoint's config says about how its weights are stored: stdlib only, so that the adapter files
(floor 2) and the model loader (floor 4) read it the same way."""

from __future__ import annotations

from typing import Any


def base_quantization(config) -> dict[str, Any] | None:
    """A checkpoint's quantization as diablo-cli names it, from its config (a transformers config or the
    config.json mapping): ``{"method": "gptq", "bits": 4, "group_size": 128}``, ``{"method": "bnb-4bit", "bits":
    4, "quant_type": "nf4"}``, ``{"method": "bnb-8bit", "bits": 8}``; other methods keep their own name.
    None for a full-precision checkpoint."""
    if isinstance(config, dict):
        found = config.get("quantization_config")
    else:
        found = getattr(config, "quantization_config", None)
    if not found:
        return None
    settings = found if isinstance(found, dict) else found.to_dict()
    method = settings.get("quant_method")
    method = str(getattr(method, "value", method) or "unknown")
    if method == "bitsandbytes":
        if settings.get("load_in_4bit"):
            return {"method": "bnb-4bit", "bits": 4, "quant_type": settings.get("bnb_4bit_quant_type", "fp4")}
        return {"method": "bnb-8bit", "bits": 8}
    return {"method": method} | {key: settings[key] for key in ("bits", "group_size") if settings.get(key) is not None}
