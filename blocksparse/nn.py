"""`BlockSparseLinear`: a drop-in for `nn.Linear` whose weight is block-sparse."""

from __future__ import annotations

import torch
from torch import nn

from .format import DEFAULT_BLOCK_SIZE, BlockSparseWeight, check_block_size, check_divisible
from .masks import magnitude_block_mask
from .ops import block_sparse_linear


class BlockSparseLinear(nn.Module):
    """y = x W^T + bias with W stored as b x b blocks (BSR) of a fixed structure.

    The bias (if any) is an ordinary Parameter; the block values are a Parameter
    frozen by default (`weight.requires_grad_()` trains the kept blocks, never the
    structure), so PEFT and optimizers leave them alone unless asked.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 block_size: int = DEFAULT_BLOCK_SIZE, device=None, dtype=None):
        super().__init__()
        block_size = check_block_size(block_size)
        check_divisible((out_features, in_features), block_size)
        self.in_features = in_features
        self.out_features = out_features
        # An empty structure (density 0) until a weight is set or loaded.
        empty = torch.empty(0, block_size, block_size, device=device, dtype=dtype)
        crow = torch.zeros(out_features // block_size + 1, dtype=torch.int32, device=device)
        col = torch.zeros(0, dtype=torch.int32, device=device)
        self.sparse_weight = BlockSparseWeight(crow, col, empty, (out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, block_mask: torch.Tensor | None = None,
                    sparsity: float | None = None, block_size: int | None = None, *,
                    row_perm: torch.Tensor | None = None, row_group: int = 1) -> "BlockSparseLinear":
        """Convert `linear`, keeping the blocks in `block_mask` [out/b, in/b].

        With `sparsity` and no mask, each block row keeps its largest-magnitude
        blocks (`blocksparse.masks.magnitude_block_mask`); with neither, every
        block is kept (density 1). block_size: b (default 16; with a mask, read
        from its shape, and checked against it when given). row_perm / row_group: the weight's row grouping
        (`BlockSparseWeight`), as `prune_model(row_group=G)` chooses it.
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear expects an nn.Linear, got {type(linear).__name__}")
        if block_mask is not None and sparsity is not None:
            raise ValueError("give either block_mask or sparsity, not both")
        if block_size is not None:
            block_size = check_block_size(block_size)
        weight = linear.weight.detach()
        if block_mask is None:
            block_mask = magnitude_block_mask(weight, sparsity or 0.0, block_size or DEFAULT_BLOCK_SIZE)
        sparse_weight = BlockSparseWeight.from_dense(weight, block_mask.to(weight.device), block_size,
                                                     row_perm=row_perm, row_group=row_group)
        module = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                     block_size=sparse_weight.block_size, device=weight.device, dtype=weight.dtype)
        module.sparse_weight = sparse_weight
        if linear.bias is not None:
            module.bias = nn.Parameter(linear.bias.detach().clone(),
                                       requires_grad=linear.bias.requires_grad)
        return module

    # Introspection that users and PEFT look for.
    @property
    def weight(self) -> torch.Tensor:
        """The stored block values [nnz, b, b] (a Parameter). Use `to_dense()` for W [N, K]."""
        return self.sparse_weight.values

    @property
    def block_size(self) -> int:
        return self.sparse_weight.block_size

    @property
    def density(self) -> float:
        return self.sparse_weight.density

    @property
    def block_mask(self) -> torch.Tensor:
        return self.sparse_weight.block_mask

    def to_dense(self) -> torch.Tensor:
        return self.sparse_weight.to_dense()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return block_sparse_linear(x, self.sparse_weight, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, block_size={self.block_size}, "
                f"density={self.density:.3f}")
