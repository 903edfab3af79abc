"""MagR and its calibration statistics: the ℓ1 projection and ℓ∞ prox against independent references, MagR's
effect and optimality on a layer with outliers, and the Gram matrices against inputs captured by hand."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama
from torch import nn

from diablo_cli.errors import DiaBloError
from diablo_cli.quantize.grams import collect_input_grams, relative_output_error
from diablo_cli.quantize.magr import largest_eigenvalue, magr, magr_stats, project_l1_ball, prox_linf


def _rows_with_radii(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random rows in float64, with radii from 0 through inside-the-ball, and a few rows full of ties."""
    generator = torch.Generator().manual_seed(seed)
    rows = torch.randn(40, 9, generator=generator, dtype=torch.float64)
    rows[:4] = torch.tensor([1.0, -1.0, 1.0, 0.0, 0.0, -1.0, 1.0, 1.0, -1.0], dtype=torch.float64)
    norms = rows.abs().sum(dim=1)
    radii = norms * torch.linspace(0, 1.5, 40, dtype=torch.float64)
    return rows, radii


def _bisection_projection(row: torch.Tensor, radius: float) -> torch.Tensor:
    """The projection from its definition: soft-threshold at the θ whose result has ℓ1 norm ``radius``."""
    if row.abs().sum() <= radius:
        return row.clone()
    low, high = 0.0, float(row.abs().max())
    for _ in range(200):
        middle = (low + high) / 2
        if (row.abs() - middle).clamp(min=0).sum() > radius:
            low = middle
        else:
            high = middle
    return row.sign() * (row.abs() - high).clamp(min=0)


def test_l1_projection_matches_bisection_and_stays_in_the_ball():
    rows, radii = _rows_with_radii()
    projected = project_l1_ball(rows, radii)
    assert (projected.abs().sum(dim=1) <= radii + 1e-12).all()
    expected = torch.stack([_bisection_projection(row, float(r)) for row, r in zip(rows, radii, strict=True)])
    torch.testing.assert_close(projected, expected, atol=1e-12, rtol=0)


def test_l1_projection_on_wide_rows_matches_bisection_whatever_the_support_size():
    """Rows wider than the first partial sort (16), with radii whose supports run from 1 entry to all 200: the
    widening top-k path must give what the full definition gives."""
    generator = torch.Generator().manual_seed(5)
    rows = torch.randn(60, 200, generator=generator, dtype=torch.float64)
    rows[::7, :3] *= 25.0  # outliers: supports of one to three entries at small radii
    radii = rows.abs().sum(dim=1) * torch.logspace(-4, 0, 60, dtype=torch.float64)
    projected = project_l1_ball(rows, radii)
    expected = torch.stack([_bisection_projection(row, float(r)) for row, r in zip(rows, radii, strict=True)])
    torch.testing.assert_close(projected, expected, atol=1e-12, rtol=0)
    supports = (projected != 0).sum(dim=1)
    assert supports.min() <= 3 and supports.max() > 64  # every path taken: top-16, widened to 64, full sort


def test_l1_projection_is_the_closest_point_of_the_ball():
    """Variational inequality ⟨v − p, q − p⟩ ≤ 0 for all q in the ball; its worst q is a vertex ±r·eᵢ."""
    rows, radii = _rows_with_radii(seed=1)
    projected = project_l1_ball(rows, radii)
    residual = rows - projected
    worst = radii * residual.abs().amax(dim=1) - (residual * projected).sum(dim=1)
    assert (worst <= 1e-12).all()


def test_l1_projection_leaves_points_inside_alone_and_is_idempotent():
    rows, radii = _rows_with_radii(seed=2)
    projected = project_l1_ball(rows, radii)
    inside = rows.abs().sum(dim=1) <= radii
    assert inside.any() and (~inside).any()
    assert torch.equal(projected[inside], rows[inside])
    torch.testing.assert_close(project_l1_ball(projected, radii), projected, atol=1e-12, rtol=0)
    assert torch.equal(project_l1_ball(rows, 0.0), torch.zeros_like(rows))


def test_l1_projection_broadcasts_a_radius_per_row_over_leading_dimensions():
    rows = torch.randn(3, 4, 10, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    radii = torch.rand(3, 4, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    batched = project_l1_ball(rows, radii)
    flat = project_l1_ball(rows.reshape(12, 10), radii.reshape(12))
    torch.testing.assert_close(batched.reshape(12, 10), flat)
    with pytest.raises(ValueError, match="negative"):
        project_l1_ball(rows, -1.0)


def test_prox_linf_satisfies_moreau_decomposition():
    rows, radii = _rows_with_radii(seed=5)
    torch.testing.assert_close(prox_linf(rows, radii) + project_l1_ball(rows, radii), rows, atol=1e-12, rtol=0)
    # the scaled form prox_{t‖·‖∞}(v) = t·(v/t − Proj_{unit ball}(v/t)) checks the projection's homogeneity too
    t = 0.7
    torch.testing.assert_close(prox_linf(rows, t), t * (rows / t - project_l1_ball(rows / t, 1.0)))
    assert torch.equal(prox_linf(rows, 0.0), rows)
    torch.testing.assert_close(prox_linf(rows, rows.abs().sum(dim=1)), torch.zeros_like(rows), atol=1e-12, rtol=0)


@pytest.mark.parametrize("point", [(0.9, -0.3), (1.2, 1.1), (-0.2, 0.05), (0.5, 0.5)])
def test_prox_linf_is_the_minimiser_on_a_fine_grid(point):
    """½‖x − v‖² + t‖x‖∞ over a 0.0025-spaced grid: nothing beats the prox, and its minimum sits next to it."""
    v = torch.tensor(point, dtype=torch.float64)
    t = 0.4
    prox = prox_linf(v, t)
    axis = torch.arange(-1.5, 1.5, 0.0025, dtype=torch.float64)
    grid = torch.cartesian_prod(axis, axis)
    objective = 0.5 * ((grid - v) ** 2).sum(dim=1) + t * grid.abs().amax(dim=1)
    best = objective.argmin()
    prox_objective = 0.5 * ((prox - v) ** 2).sum() + t * prox.abs().max()
    assert prox_objective <= objective[best] + 1e-12
    assert (grid[best] - prox).abs().max() < 0.005


def _layer_with_outliers(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A 48×96 weight with one large entry per row, and the Gram matrix of 1024 correlated inputs.

    The inputs mimic an LLM layer's: a 12-dimensional latent structure plus small noise (full rank, condition
    number ~1e5) and three loud channels.
    """
    generator = torch.Generator().manual_seed(seed)
    tokens, in_features, out_features = 1024, 96, 48
    inputs = torch.randn(tokens, 12, generator=generator) @ torch.randn(12, in_features, generator=generator)
    inputs = inputs + 0.1 * torch.randn(tokens, in_features, generator=generator)
    inputs[:, :3] *= 6
    weight = torch.randn(out_features, in_features, generator=generator) * 0.05
    columns = torch.randint(0, in_features, (out_features,), generator=generator)
    signs = torch.randn(out_features, generator=generator).sign()
    weight[torch.arange(out_features), columns] = (0.3 + 0.3 * torch.rand(out_features, generator=generator)) * signs
    return weight, inputs.T @ inputs / tokens


def test_magr_shrinks_every_channel_maximum_and_keeps_the_output():
    weight, gram = _layer_with_outliers()
    reduced = magr(weight, gram)
    assert (reduced.abs().amax(dim=1) < weight.abs().amax(dim=1)).all()
    stats = magr_stats(weight, reduced, gram)
    assert stats.range_reduction > 0.3
    assert stats.output_error < 0.05
    assert stats.largest_after < stats.largest_before


def test_magr_per_group_shrinks_the_groups_with_outliers():
    weight, gram = _layer_with_outliers()
    for group_size in (32, 40):  # 40 leaves a ragged last group of 16
        reduced = magr(weight, gram, group_size=group_size)
        assert reduced.shape == weight.shape
        groups = -(-weight.shape[1] // group_size)
        before = [weight[:, g * group_size : (g + 1) * group_size].abs().amax(dim=1) for g in range(groups)]
        after = [reduced[:, g * group_size : (g + 1) * group_size].abs().amax(dim=1) for g in range(groups)]
        before, after = torch.stack(before, dim=1), torch.stack(after, dim=1)
        with_outlier = before > 0.25
        assert (after[with_outlier] < before[with_outlier]).all()
        assert after.mean() < 0.95 * before.mean()
        stats = magr_stats(weight, reduced, gram, group_size=group_size)
        assert stats.mean_range_before == pytest.approx(float(before.mean()))
        assert stats.output_error < 0.05


def test_magr_strength_grows_with_alpha_and_vanishes_at_zero():
    weight, gram = _layer_with_outliers()
    assert torch.equal(magr(weight, gram, alpha=0.0), weight)
    alphas = (3e-4, 1e-3, 3e-3)
    ranges = [magr_stats(weight, magr(weight, gram, alpha=alpha), gram).mean_range_after for alpha in alphas]
    assert ranges[0] > ranges[1] > ranges[2]


def test_magr_ignores_the_scale_of_the_gram_matrix():
    """α is measured against λ_max(H): more tokens or louder activations must not change the answer."""
    weight, gram = _layer_with_outliers()
    torch.testing.assert_close(magr(weight, gram * 1000.0), magr(weight, gram), atol=1e-6, rtol=1e-5)


def test_magr_reaches_the_optimum_of_its_objective():
    """KKT on a small well-conditioned layer: with g = (Ŵ − W)H/λ_max, each row's −g lies in α·∂‖ŵ‖∞, i.e.
    ‖g‖₁ = α, g vanishes off the entries of largest magnitude and opposes their signs."""
    generator = torch.Generator().manual_seed(6)
    inputs = torch.randn(400, 6, generator=generator, dtype=torch.float64)
    gram = inputs.T @ inputs / 400
    weight = torch.randn(4, 6, generator=generator, dtype=torch.float64)
    alpha = 0.2
    reduced = magr(weight, gram, alpha=alpha, iterations=3000)
    gradient = (reduced - weight).float() @ (gram.float() / torch.linalg.eigvalsh(gram)[-1].float())
    torch.testing.assert_close(gradient.abs().sum(dim=1), torch.full((4,), alpha), atol=1e-4, rtol=0)
    at_max = reduced.abs() >= reduced.abs().amax(dim=1, keepdim=True) - 1e-4
    assert gradient[~at_max].abs().max() < 1e-4
    assert (gradient[at_max] * reduced[at_max].sign() <= 1e-6).all()
    assert (reduced.abs().amax(dim=1) < weight.abs().amax(dim=1)).all()


def test_magr_keeps_dtype_and_device_and_checks_shapes():
    weight, gram = _layer_with_outliers()
    reduced = magr(weight.to(torch.bfloat16), gram.double(), iterations=5)
    assert reduced.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="do not fit"):
        magr(weight, gram[:10, :10])
    with pytest.raises(ValueError, match="group_size"):
        magr(weight, gram, group_size=0)


def test_largest_eigenvalue_matches_eigvalsh():
    _, gram = _layer_with_outliers()
    assert largest_eigenvalue(gram) == pytest.approx(float(torch.linalg.eigvalsh(gram.double())[-1]), rel=1e-6)
    assert largest_eigenvalue(torch.zeros(5, 5)) == 0.0


def test_relative_output_error_equals_the_direct_computation():
    generator = torch.Generator().manual_seed(7)
    inputs = torch.randn(300, 20, generator=generator, dtype=torch.float64)
    weight = torch.randn(8, 20, generator=generator, dtype=torch.float64)
    perturbed = weight + 0.03 * torch.randn(8, 20, generator=generator, dtype=torch.float64)
    direct = float(torch.linalg.norm(inputs @ (weight - perturbed).T) / torch.linalg.norm(inputs @ weight.T))
    assert relative_output_error(weight, perturbed, inputs.T @ inputs / 300) == pytest.approx(direct, rel=1e-5)
    assert relative_output_error(weight, perturbed, inputs.T @ inputs) == pytest.approx(direct, rel=1e-5)
    assert relative_output_error(weight, weight, inputs.T @ inputs) == 0.0


def _linear_names(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, nn.Linear) and ".layers." in name]


def _padded_batches() -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(8)
    batches = []
    for lengths in ((12, 7), (5, 12)):
        input_ids = torch.randint(0, 128, (2, 12), generator=generator)
        attention_mask = torch.zeros(2, 12, dtype=torch.long)
        for row, length in enumerate(lengths):
            attention_mask[row, :length] = 1
        batches.append({"input_ids": input_ids, "attention_mask": attention_mask})
    return batches


def test_grams_equal_the_masked_input_products_captured_by_hand():
    model = tiny_llama()
    names = _linear_names(model)
    batches = _padded_batches()
    captured: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    modules = dict(model.named_modules())
    handles = [
        modules[name].register_forward_hook(lambda module, args, output, name=name: captured[name].append(args[0]))
        for name in names
    ]
    with torch.no_grad():
        for batch in batches:
            model(**batch)
    for handle in handles:
        handle.remove()

    grams = collect_input_grams(model, batches, names)

    assert list(grams) == names
    for name in names:
        rows = torch.cat(
            [inputs[batch["attention_mask"].bool()] for inputs, batch in zip(captured[name], batches, strict=True)]
        )
        assert rows.shape[0] == 12 + 7 + 5 + 12
        torch.testing.assert_close(grams[name], rows.T @ rows / rows.shape[0])
    layer = "model.layers.1"
    assert grams[f"{layer}.self_attn.q_proj"] is grams[f"{layer}.self_attn.k_proj"]
    assert grams[f"{layer}.self_attn.q_proj"] is grams[f"{layer}.self_attn.v_proj"]
    assert grams[f"{layer}.mlp.gate_proj"] is grams[f"{layer}.mlp.up_proj"]
    assert grams[f"{layer}.self_attn.o_proj"] is not grams[f"{layer}.self_attn.q_proj"]


@pytest.mark.parametrize("max_bytes", [1, 64 * 64 * 4 * 3])
def test_chunked_grams_equal_unchunked_and_report_progress(max_bytes):
    model = tiny_llama()
    names = _linear_names(model)
    whole = collect_input_grams(model, _padded_batches(), names)
    calls: list[tuple[int, int]] = []
    chunked = collect_input_grams(
        model, _padded_batches(), names, max_bytes=max_bytes, progress=lambda done, total: calls.append((done, total))
    )
    assert list(chunked) == names
    for name in names:
        torch.testing.assert_close(chunked[name], whole[name])
    total = calls[-1][1]
    assert total > 2 and total % 2 == 0
    assert calls == [(done, total) for done in range(1, total + 1)]


def test_a_chunk_early_in_the_model_stops_the_forward_there():
    model = tiny_llama()
    later_calls = []
    model.lm_head.register_forward_pre_hook(lambda module, args: later_calls.append(1))
    model.model.layers[1].register_forward_pre_hook(lambda module, args: later_calls.append(1))
    grams = collect_input_grams(model, _padded_batches(), ["model.layers.0.self_attn.q_proj"])
    assert later_calls == []
    assert grams["model.layers.0.self_attn.q_proj"].shape == (64, 64)


def test_hooks_come_off_and_modes_come_back_even_when_a_forward_fails():
    model = tiny_llama().train()
    names = _linear_names(model)
    collect_input_grams(model, _padded_batches(), names, max_bytes=64 * 64 * 4)
    bad_batch = {"input_ids": torch.full((1, 4), 10_000)}  # out of the vocabulary: the embedding raises
    with pytest.raises(IndexError):
        collect_input_grams(model, [*_padded_batches(), bad_batch], names)
    assert all(not module._forward_pre_hooks for module in model.modules())
    assert all(module.training for module in model.modules())


def test_grams_refuse_unknown_and_non_linear_modules():
    model = tiny_llama()
    with pytest.raises(DiaBloError, match="no module named"):
        collect_input_grams(model, _padded_batches(), ["model.layers.0.self_attn.x_proj"])
    with pytest.raises(DiaBloError, match="not a linear layer"):
        collect_input_grams(model, _padded_batches(), ["model.norm"])
