"""The method itself: a frozen linear-like layer plus a trainable block-diagonal update.

Notation (torch layout): the base computes ``y = x W0ᵀ`` with ``W0`` of shape ``(out, in)``. The adapter
holds ``D`` of shape ``(blocks, block_in, block_out)`` with ``block_in = ceil(in / blocks)`` and
``block_out = ceil(out / blocks)``; output slice ``j`` receives ``x[..., j*block_in:(j+1)*block_in] @ D[j]``.
When ``blocks`` does not divide a dimension the input is zero-padded and the output truncated (paper §3.1).
How the layer computes (folding the blocks into a dense base weight, or separate block products) is in
``kernels``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from ..errors import DiaBloError
from .kernels import FoldedLinear, block_diagonal_matmul, check_kernel, dense_update, diagonal_blocks

_OPTIMIZER_STEPS = [0]
"""Steps any torch optimizer has taken in this process. torch's fused Adam/AdamW (transformers' default
``adamw_torch_fused``) update parameters without bumping their version counter, so a folded layer cannot tell
from the blocks alone that they changed; every step counts as a change."""


def _count_optimizer_step(_optimizer, _args, _kwargs) -> None:
    _OPTIMIZER_STEPS[0] += 1


register_optimizer_step_post_hook(_count_optimizer_step)

ADAPTER_PARAMETER = "diablo_blocks"
"""Name of the trainable tensor inside each adapted layer, and the suffix of its key in adapter files."""


@dataclass(frozen=True)
class BlockLayout:
    """How ``blocks`` diagonal blocks tile an ``in_features × out_features`` layer."""

    in_features: int
    out_features: int
    blocks: int

    @property
    def block_in(self) -> int:
        return math.ceil(self.in_features / self.blocks)

    @property
    def block_out(self) -> int:
        return math.ceil(self.out_features / self.blocks)

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.blocks, self.block_in, self.block_out)

    @property
    def parameters(self) -> int:
        return self.blocks * self.block_in * self.block_out

    def live_rows_cols(self, block: int) -> tuple[int, int]:
        """Real (not padding) input rows and output columns that block ``block`` touches."""
        rows = max(0, min(self.block_in, self.in_features - block * self.block_in))
        cols = max(0, min(self.block_out, self.out_features - block * self.block_out))
        return rows, cols

    @property
    def dead_parameters(self) -> int:
        """Entries of D that only ever multiply padding or land in truncated outputs: never trained."""
        live = sum(rows * cols for rows, cols in map(self.live_rows_cols, range(self.blocks)))
        return self.parameters - live

    @property
    def dead_blocks(self) -> int:
        """Whole blocks with no live entry at all (more blocks than one dimension has features)."""
        return sum(1 for b in range(self.blocks) if 0 in self.live_rows_cols(b))


def linear_features(module: nn.Module) -> tuple[int, int] | None:
    """``(in_features, out_features)`` of a linear-like module, or None if it is not one.

    Covers ``nn.Linear`` and its quantized subclasses (bitsandbytes), GPTQ quant-linear layers (which
    carry ``in_features``/``out_features`` but keep their weights packed in buffers), and the transposed
    ``Conv1D`` of GPT-2 style models. Nothing here reads the weight's values.
    """
    if is_conv1d(module):
        return int(module.weight.shape[0]), int(module.nf)
    in_features = getattr(module, "in_features", None)
    out_features = getattr(module, "out_features", None)
    if isinstance(in_features, int) and isinstance(out_features, int) and not isinstance(module, DiaBloLinear):
        return in_features, out_features
    return None


def is_conv1d(module: nn.Module) -> bool:
    """GPT-2's ``Conv1D``: a linear layer whose weight is stored ``(in, out)``."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def is_dense_float(module: nn.Module) -> bool:
    """True when the layer's weight is an ordinary float matrix that a merge can add to."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
        return False
    return type(weight) in (torch.Tensor, nn.Parameter) and (isinstance(module, nn.Linear) or is_conv1d(module))


def _module_device(module: nn.Module) -> torch.device:
    for tensor in (*module.parameters(), *module.buffers()):
        return tensor.device
    return torch.device("cpu")


def _unfold_before_saving(module: DiaBloLinear, prefix: str, keep_vars: bool) -> None:
    module.unfold()


def _unfold_before_loading(module: DiaBloLinear, *args) -> None:
    module.unfold()  # the diagonal kept for W0 would otherwise overwrite what is loaded


class DiaBloLinear(nn.Module):
    """A frozen linear-like ``base`` plus a trainable block-diagonal update, zero-initialised.

    ``kernel`` picks how it computes (see :mod:`diablo_cli.adapter.kernels`): ``auto``/``fold`` add the
    blocks into a dense float base's weight while the adapter is active, so the base's own matmuls carry the
    update; everything else (quantized bases, block counts that do not divide the layer, adapter dropout
    while training, a weight tied to another module) takes the ``blocks`` path, which calls ``base`` as it is
    and never reads its weight. There the update runs in the adapter's dtype: inputs are cast in and the
    result cast back to the base output's dtype, so a bf16/fp16 base trains fp32 blocks without autocast.
    Whatever the path, ``base.weight`` reads as the original ``W0`` from outside: merging, detaching,
    disabling the adapter and ``state_dict()`` restore it first.
    """

    def __init__(
        self,
        base: nn.Module,
        blocks: int,
        *,
        dropout: float = 0.0,
        dtype: torch.dtype = torch.float32,
        kernel: str = "auto",
    ) -> None:
        super().__init__()
        features = linear_features(base)
        if features is None:
            raise DiaBloError(f"{type(base).__name__} is not a linear layer; DiaBlo adapts linear layers only")
        self.base = base
        self.layout = BlockLayout(*features, blocks)
        self.diablo_blocks = nn.Parameter(torch.zeros(self.layout.shape, dtype=dtype, device=_module_device(base)))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.kernel = check_kernel(kernel)
        self.merged = False
        self.active = True  # False: behave as the bare base (see adapters_disabled)
        self.shares_weight = False  # True: base.weight is tied to another module, never write into it
        self._original_diagonal: torch.Tensor | None = None  # W0's diagonal blocks while folded
        self._folded_version: tuple[int, int, int] | None = None  # (data_ptr, version, optimizer steps) folded in
        self.register_state_dict_pre_hook(_unfold_before_saving)
        self._register_load_state_dict_pre_hook(_unfold_before_loading, with_module=True)

    @property
    def in_features(self) -> int:
        return self.layout.in_features

    @property
    def out_features(self) -> int:
        return self.layout.out_features

    @property
    def weight(self) -> torch.Tensor:
        """The base's weight, for model code that inspects it (T5's feed-forward checks ``wo.weight.dtype``)."""
        return self.base.weight

    @property
    def folded(self) -> bool:
        """True while the blocks live inside ``base.weight`` (the fold path)."""
        return self._original_diagonal is not None

    def can_fold(self, training: bool | None = None) -> bool:
        """Whether the fold path applies (in training mode or not; default: the module's current mode): a plain
        frozen float weight of its own, divisible dimensions, and no dropout to apply to the adapter branch alone."""
        training = self.training if training is None else training
        layout = self.layout
        weight = getattr(self.base, "weight", None)
        return (
            self.kernel != "blocks"
            and (type(self.base) is nn.Linear or is_conv1d(self.base))
            and is_dense_float(self.base)
            and not weight.requires_grad
            and weight.device == self.diablo_blocks.device
            and layout.in_features % layout.blocks == 0
            and layout.out_features % layout.blocks == 0
            and not (training and isinstance(self.dropout, nn.Dropout))
            and not self.shares_weight
            and not hasattr(self.base, "_hf_hook")  # accelerate offloading swaps weights in and out
        )

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.merged or not self.active:
            self.unfold()
            return self.base(x, *args, **kwargs)
        if not args and not kwargs and self.can_fold():
            self._fold()
            return FoldedLinear.apply(x, self.base.weight, self.diablo_blocks, self.base, is_conv1d(self.base))
        self.unfold()
        y = self.base(x, *args, **kwargs)
        update = block_diagonal_matmul(
            self.dropout(x.to(self.diablo_blocks.dtype)), self.diablo_blocks, self.out_features
        )
        return y + update.to(y.dtype)

    @torch.no_grad()
    def _fold(self) -> None:
        """Write ``W0 + D`` into the weight's diagonal blocks when the blocks may have changed since the last fold
        (an in-place write bumps their version; an optimizer step, fused ones included, counts too): a copy the
        size of the adapter, not of the weight."""
        blocks = self.diablo_blocks
        stamp = (blocks.data_ptr(), blocks._version, _OPTIMIZER_STEPS[0])
        if stamp == self._folded_version:
            return
        diagonal = self._weight_diagonal()
        if self._original_diagonal is None:
            self._original_diagonal = diagonal.clone()
        diagonal.copy_(self._original_diagonal.float() + blocks.float())  # a merge's arithmetic
        self._folded_version = stamp

    @torch.no_grad()
    def unfold(self) -> None:
        """Put ``W0``'s diagonal blocks back, bit for bit; a no-op when not folded."""
        if self._original_diagonal is None:
            return
        self._weight_diagonal().copy_(self._original_diagonal)
        self._original_diagonal = None
        self._folded_version = None

    def _weight_diagonal(self) -> torch.Tensor:
        """The base weight's diagonal blocks as a writable view shaped like the adapter's blocks."""
        return diagonal_blocks(self.base.weight, self.diablo_blocks, transposed=is_conv1d(self.base))

    def delta_weight(self) -> torch.Tensor:
        """The dense ``(out, in)`` fp32 weight delta that merging adds to the base."""
        return dense_update(self.diablo_blocks.detach().float(), self.in_features, self.out_features)

    def merge(self) -> None:
        """Fold the blocks into the base weight (arithmetic in fp32); forward then skips the adapter."""
        if not self.merged:
            self.unfold()
            self._add_to_base(sign=1.0)
            self.merged = True

    def unmerge(self) -> None:
        """Undo :meth:`merge`; exact for fp32 bases, within one rounding step of the base dtype otherwise."""
        if self.merged:
            self._add_to_base(sign=-1.0)
            self.merged = False

    def check_mergeable(self) -> None:
        """Raise if the base weight cannot take the update (a quantized base must be dequantized first)."""
        if not is_dense_float(self.base):
            raise DiaBloError(
                f"cannot merge into a {type(self.base).__name__} base: its weight is not a dense float matrix "
                "(quantized bases must be dequantized first)"
            )

    def untie_base_weight(self) -> None:
        """Give the base its own copy of a weight it shares with another module (a tied ``lm_head``), so
        that merging changes this layer and not the input embeddings too."""
        self.unfold()
        weight = self.base.weight
        self.base.weight = nn.Parameter(weight.detach().clone(), requires_grad=weight.requires_grad)
        self.shares_weight = False

    def _add_to_base(self, sign: float) -> None:
        self.check_mergeable()
        weight = self.base.weight
        delta = self.delta_weight().to(weight.device)
        if is_conv1d(self.base):
            delta = delta.T
        with torch.no_grad():
            weight.copy_((weight.float() + sign * delta).to(weight.dtype))

    def extra_repr(self) -> str:
        layout = self.layout
        return (
            f"in_features={layout.in_features}, out_features={layout.out_features}, blocks={layout.blocks}, "
            f"block_in={layout.block_in}, block_out={layout.block_out}, kernel={self.kernel}, merged={self.merged}"
        )
