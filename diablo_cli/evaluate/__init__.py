"""Evaluation, shared by `diablo train` (before/after scores) and `diablo eval` (side-by-side comparisons).

- `tasks`: the built-in benchmarks (GSM8K, MATH, SVAMP, MAWPS, AQuA, eight commonsense sets, HumanEval, HEx-PHI,
  GLUE, the quickstart task): where their data lives and how an answer is judged (`answers`, `metrics`);
- `generation` and `likelihood`: batched decoding and choice scoring; `code` and `sandbox`: HumanEval pass@k
  with generated programs run in a sandboxed subprocess; `safety`: refusal classifiers;
- `runner` scores one loaded model; `compare` plans and runs a whole comparison; `harness` hands a model to
  lm-evaluation-harness.
"""

from .exact_match import exact_match, normalize_answer
from .generation import Sampling, generate, generate_samples

__all__ = ["Sampling", "exact_match", "generate", "generate_samples", "normalize_answer"]
