"""The paper's training sets by name, so that a recipe needs one line (`preset: metamathqa`) per dataset.

Each preset fills what the user left unset: path (a hub id or a file URL), name, split, format, fields and
template. Anything the recipe sets itself wins: `preset: codealpaca` with `limit: 1000`, or with
`path: codealpaca.jsonl` to read a local copy of the data with the preset's format, fields and template.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from ..errors import DiaBloError
from ..glue import GLUE_LABELS, glue_prompt, glue_target
from .config import DatasetSource


@dataclass(frozen=True)
class Preset:
    path: str
    format: str
    template: str | None
    fields: dict[str, str] = field(default_factory=dict)
    name: str | None = None
    split: str = "train"
    about: str = ""
    rows: Callable[[dict[str, Any]], dict[str, Any]] | None = None  # a raw row to the format's columns


def glue_row(task: str, row: dict[str, Any]) -> dict[str, str]:
    """A GLUE row as a prompt and completion, in T5's text-to-text form (the eval tasks' very rendering)."""
    return {"prompt": glue_prompt(task, row), "completion": glue_target(task, row)}


PRESETS: dict[str, Preset] = {
    # LLM-Adapters (Hu et al., 2023) ft-training_set/commonsense_170k.json, as mirrored on the hub by zwhe99
    # (the copy DoRA-style commonsense recipes load); columns instruction, input (empty), output, answer.
    "commonsense-170k": Preset(
        path="zwhe99/commonsense_170k",
        format="instruction",
        template="alpaca",
        about="LLM-Adapters commonsense reasoning mix (BoolQ, PIQA, SIQA, HellaSwag, WinoGrande, ARC, OBQA)",
    ),
    # LLM-Adapters ft-training_set/math_10k.json (no hub copy from the authors); columns instruction, input,
    # output (a chain of thought), answer. Fetched once from GitHub and cached.
    "math10k": Preset(
        path="https://raw.githubusercontent.com/AGI-Edgerunners/LLM-Adapters/main/ft-training_set/math_10k.json",
        format="instruction",
        template="alpaca",
        about="LLM-Adapters arithmetic reasoning (GSM8K, AQuA, MAWPS chains of thought)",
    ),
    # MetaMath (Yu et al., 2024), hub meta-math/MetaMathQA: columns query, response, type, original_question;
    # the authors train with the Alpaca prompt without input.
    "metamathqa": Preset(
        path="meta-math/MetaMathQA",
        format="instruction",
        template="alpaca",
        fields={"instruction": "query", "output": "response"},
        about="MetaMathQA, 395k augmented GSM8K/MATH problems",
    ),
    # Code Alpaca (Chaudhary, 2023), hub sahil2801/CodeAlpaca-20k: columns instruction, input, output.
    "codealpaca": Preset(
        path="sahil2801/CodeAlpaca-20k",
        format="instruction",
        template="alpaca",
        about="Code Alpaca, 20k code instructions",
    ),
    # SaferPaca (Bianchi et al., 2024, "Safety-Tuned LLaMAs"), the safety set LoRI trains on: 20k Alpaca-cleaned
    # examples plus 2,000 safety demonstrations, data/training/saferpaca_Instructions_2000.json in
    # github.com/vinid/safety-tuned-llamas (not on the hub); columns instruction, input, output.
    "saferpaca": Preset(
        path="https://raw.githubusercontent.com/vinid/safety-tuned-llamas/main/data/training/saferpaca_Instructions_2000.json",
        format="instruction",
        template="alpaca",
        about="SaferPaca: Alpaca-cleaned plus 2,000 safety refusals",
    ),
    # WizardLM Evol-Instruct 70k (Xu et al., 2024), hub WizardLMTeam/WizardLM_evol_instruct_70k (formerly
    # WizardLM/WizardLM_evol_instruct_70k): columns instruction, output.
    "wizardlm": Preset(
        path="WizardLMTeam/WizardLM_evol_instruct_70k",
        format="instruction",
        template="alpaca",
        about="WizardLM Evol-Instruct, 70k evolved instructions",
    ),
    # GLUE (Wang et al., 2019), hub nyu-mll/glue, one config per task, as T5 reads it (paper Table 8): the
    # prompt is the task's name and its fields, the completion the label's name (eval's glue-* tasks score it).
    **{
        f"glue-{task}": Preset(
            path="nyu-mll/glue",
            name=task,
            format="prompt_completion",
            template="plain",
            about=f"GLUE {task.upper()} training set, T5 text-to-text labels",
            rows=partial(glue_row, task),
        )
        for task in GLUE_LABELS
    },
}


def get_preset(name: str) -> Preset:
    """The preset called `name`, or an error listing the valid names."""
    try:
        return PRESETS[name]
    except KeyError:
        raise DiaBloError(f"unknown dataset preset {name!r}; valid presets: {', '.join(PRESETS)}") from None


def resolve_source(source: DatasetSource) -> DatasetSource:
    """The source with its preset expanded: a plain source (path set, preset None). Idempotent."""
    if source.preset is None:
        return source
    preset = get_preset(source.preset)
    given = source.model_fields_set
    values = source.model_dump()
    values["preset"] = None
    if source.path is None:  # a path given beside a preset is a local copy of the preset's data
        values["path"] = preset.path
    for key in ("name", "split", "format", "template"):
        if key not in given or values[key] is None:
            values[key] = getattr(preset, key)
    values["fields"] = {**preset.fields, **source.fields}
    if values["format"] in ("chat", "text"):
        values["template"] = None
    return DatasetSource.model_validate(values)
