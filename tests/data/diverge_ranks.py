"""Run by tests/test_divergence.py under `accelerate launch`: train a recipe whose training losses explode (× 100)
on forward passes FIRST to LAST of every process, then write this process's trainable weights to
DUMP_DIR/rankN.safetensors, so that the test can check that a rollback leaves every rank with the same adapter.

    accelerate launch ... tests/data/diverge_ranks.py FIRST LAST RECIPE DUMP_DIR [KEY=VALUE ...]
"""

import os
import sys

import torch
from safetensors.torch import save_file

from diablo_cli.loss import LossPath
from diablo_cli.recipe import load_recipe
from diablo_cli.train import train

first, last, recipe_path, dump_dir, *overrides = sys.argv[1:]
real_loss = LossPath.loss
calls = {"n": 0}


def exploding(*args, **kwargs):
    loss = real_loss(*args, **kwargs)
    if not torch.is_grad_enabled():
        return loss
    calls["n"] += 1
    return loss * 100.0 if int(first) <= calls["n"] <= int(last) else loss


LossPath.loss = exploding
result = train(load_recipe(recipe_path, overrides))
weights = {name: p.detach().contiguous() for name, p in result.model.named_parameters() if p.requires_grad}
save_file(weights, os.path.join(dump_dir, f"rank{os.environ['RANK']}.safetensors"))
