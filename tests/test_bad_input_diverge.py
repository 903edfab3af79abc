"""Bad input and divergence through `diablo train`, under the shared contract (tests/user_files.py): the exit code,
no traceback, one stderr line naming the culprit, the user's files byte-identical.

Divergence cases scale chosen training losses (test_divergence.poison_losses), so they need no learning rate
above 1; a stop names only a checkpoint that is good.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from test_divergence import poison_losses
from user_files import Case, check_case

RECIPE = {
    "base_model": "tiny-random-llama",
    "model": {"dtype": "fp32"},
    "adapter": {"blocks": 8, "target_modules": "QKVOGUD"},
    "data": {
        "datasets": [
            {"path": "bundled://quickstart/train.jsonl", "format": "prompt_completion", "template": "chat", "limit": 64}
        ],
        "max_length": 128,
    },
    "training": {
        "max_steps": 12,
        "micro_batch_size": 4,
        "learning_rate": 1.0e-3,
        "warmup_steps": 2,
        "logging_steps": 1,
        "save_steps": 2,
    },
    "logging": {"progress": False},
    "output": {"dir": "out"},
}


def recipe_with(divergence: object = None, *settings: str) -> Callable[[Path], list[str]]:
    """A recipe file whose ``training.divergence`` is ``divergence`` (left out when None), trained with ``--set``s."""

    def setup(root: Path) -> list[str]:
        recipe = {**RECIPE, "training": dict(RECIPE["training"])}
        if divergence is not None:
            recipe["training"]["divergence"] = divergence
        (root / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
        return ["train", "recipe.yaml", *(part for setting in settings for part in ("--set", setting))]

    return setup


NAN = float("nan")
CASES = [
    Case("patience-zero", recipe_with({"patience": 0}), ("training.divergence.patience", "valid: at least 1")),
    Case("misspelt-key", recipe_with({"lossfactor": 5}), ("training.divergence.lossfactor", "'loss_factor'")),
    Case("unknown-action", recipe_with({"action": "undo"}), ("training.divergence.action", "'rollback'")),
    Case(
        "lr-factor-above-one",
        recipe_with({"lr_factor": 1.5}),
        ("training.divergence.lr_factor", "valid: above 0 and below 1"),
    ),
    Case("loss-factor-one", recipe_with(None, "training.divergence.loss_factor=1"), "training.divergence.loss_factor"),
    Case("not-a-section", recipe_with("loose"), ("training.divergence", "valid dictionary")),
    Case("max-rollbacks-zero", recipe_with({"action": "rollback", "max_rollbacks": 0}), "max_rollbacks"),
    Case(
        "nan-after-explosion",
        recipe_with(None, "training.save_total_limit=1"),
        ("loss became nan at step 7", "last good checkpoint", "step-0000004"),
        code=3,
        created=("out",),
    ),
    Case(
        "explosion-without-nan",
        recipe_with(None),
        ("training diverged at step 7", "3 steps in a row", "step-0000004"),
        code=3,
        created=("out",),
    ),
    Case(
        "rollback-budget-exhausted",
        recipe_with({"action": "rollback", "max_rollbacks": 1}),
        ("rolled back 1 of 1 times", "training.divergence.max_rollbacks"),
        code=3,
        created=("out",),
    ),
    Case(
        "only-diverging-checkpoints",
        recipe_with(None),
        ("training diverged at step 4", "no checkpoint is good", "step-0000002", "while the run was diverging"),
        code=3,
        created=("out",),
    ),
    Case(
        "rollback-with-nothing-good",
        recipe_with({"action": "rollback"}, "training.save_steps=20"),
        ("loss became nan at step 3", "nothing to roll back to"),
        code=3,
        created=("out",),
    ),
    Case(
        "weights-past-the-ceiling",
        recipe_with({"max_weight_rms": 0.5}, "training.learning_rate=1.0"),
        ("training diverged at step 5", "max_weight_rms 0.5", "step-0000002"),
        code=3,
        created=("out",),
    ),
]

LOSS_FACTORS: dict[str, Callable[[int], float]] = {  # the n-th training forward pass's loss is multiplied by this
    "nan-after-explosion": lambda n: 100.0 if n in (5, 6) else (NAN if n == 7 else 1.0),
    "explosion-without-nan": lambda n: 100.0 if n >= 5 else 1.0,
    "rollback-budget-exhausted": lambda n: 100.0 if n >= 5 else 1.0,
    "only-diverging-checkpoints": lambda n: 100.0 if n >= 2 else 1.0,
    "rollback-with-nothing-good": lambda n: NAN if n == 3 else 1.0,
}


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.id)
def test_bad_divergence_input(case: Case, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if case.id in LOSS_FACTORS:
        poison_losses(monkeypatch, LOSS_FACTORS[case.id])
    outcome = check_case(case, tmp_path)
    if case.code == 3:  # a stop names no checkpoint written while the run diverged
        assert "step-0000006" not in outcome.stderr and "step-0000008" not in outcome.stderr
