"""What the sharded runs of fsdp_ranks.py and deepspeed_ranks.py are held to: the same steps in one process,
without sharding, on the union of both ranks' batches."""

from __future__ import annotations

import copy

import torch

LEARNING_RATE = 1e-2
MICRO_BATCH = 2


def batch(rank: int) -> torch.Tensor:
    """Rank ``rank``'s micro-batch (token ids, also the labels)."""
    return torch.randint(0, 128, (MICRO_BATCH, 12), generator=torch.Generator().manual_seed(100 + rank))


def unsharded_steps(model: torch.nn.Module, *, weight_decay: float) -> dict:
    """One process on a copy of ``model`` with the blocks kernel (as configure_sharding sets it; fold would round
    W0 + D to bf16): the mean loss over both ranks' batches, its gradients and their norm, one AdamW step, the
    optimizer's state after it, and a second step (what a resumed run must reproduce)."""
    from diablo_cli import adapted_layers

    model = copy.deepcopy(model).train()
    for layer in adapted_layers(model).values():
        layer.kernel = "blocks"
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([p for _, p in named], lr=LEARNING_RATE, weight_decay=weight_decay)

    def step() -> list[torch.Tensor]:
        optimizer.zero_grad()
        losses = [model(input_ids=batch(r), labels=batch(r)).loss for r in range(2)]
        (sum(losses) / 2).backward()
        return losses

    losses = step()
    grads = {n: p.grad.detach().clone() for n, p in named}
    norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads.values()])).item()
    optimizer.step()
    after = {n: p.detach().clone() for n, p in named}
    state = copy.deepcopy(optimizer.state_dict())
    step()
    optimizer.step()
    second = {n: p.detach().clone() for n, p in named}
    return {
        "loss": losses[0].item(),
        "grads": grads,
        "norm": norm,
        "after": after,
        "optimizer": state,
        "second": second,
    }


def worst_relative(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> float:
    """The largest difference between same-named tensors, relative to each wanted tensor's largest entry."""
    return max(((got[n].float() - want[n]).abs().max() / want[n].abs().max().clamp_min(1e-12)).item() for n in want)


def optimizer_state_difference(got: dict, want: dict) -> float:
    """The worst relative difference between two torch optimizer state dicts (same numbering), inf when their
    structure differs."""
    if set(got["state"]) != set(want["state"]):
        return float("inf")
    if [g["params"] for g in got["param_groups"]] != [g["params"] for g in want["param_groups"]]:
        return float("inf")
    return max(
        worst_relative(
            {key: torch.as_tensor(got["state"][index][key]) for key in values},
            {key: torch.as_tensor(value).float() for key, value in values.items()},
        )
        for index, values in want["state"].items()
    )
