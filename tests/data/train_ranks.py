"""Run by tests/test_multiprocess.py under `accelerate launch`: train a recipe, then write this process's
trainable weights to DUMP_DIR/rankN.safetensors, so that the test can compare what every rank ended with.

    accelerate launch ... tests/data/train_ranks.py RECIPE DUMP_DIR [KEY=VALUE ...]
"""

import os
import sys

from safetensors.torch import save_file

from diablo_cli.recipe import load_recipe
from diablo_cli.train import train

recipe_path, dump_dir, *overrides = sys.argv[1:]
result = train(load_recipe(recipe_path, overrides))
weights = {name: p.detach().contiguous() for name, p in result.model.named_parameters() if p.requires_grad}
save_file(weights, os.path.join(dump_dir, f"rank{os.environ['RANK']}.safetensors"))
