"""`block_sparse_linear`: Y = X W^T (+ bias) (+ s * drop(X) A^T B^T), W block-sparse and frozen.

Two backends behind one function:

- "triton": the fused kernels in `blocksparse.kernels` (CUDA tensors, or the
  CPU under TRITON_INTERPRET=1 for tests);
- "torch": plain PyTorch, the CPU path users get and the reference the kernels
  are tested against. For decode-sized inputs it multiplies only the stored
  blocks (see `_sparse_matmul_small_m`); for larger inputs it materialises the
  masked dense W for one call, since dense BLAS wins there on a CPU.

"auto" picks Triton for CUDA tensors and torch otherwise; the environment
variable BLOCKSPARSE_BACKEND=triton|torch overrides "auto".
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from .format import BlockSparseWeight

BACKENDS = ("auto", "torch", "triton")

# Up to this many tokens the torch backend multiplies only the stored blocks;
# above it the dense product of the masked weight is faster on a CPU
# (measured with benchmarks/bench_kernels.py on a 2-core x86 CPU, fp32).
SMALL_M_MAX = 32
# Working-set size of one chunk of block rows in the small-M path: the gathered
# X slab and the transposed weight tiles of a chunk should stay in cache.
_CHUNK_BYTES = 1 << 20


def resolve_backend(backend: str, x: torch.Tensor) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        forced = os.environ.get("BLOCKSPARSE_BACKEND", "").strip().lower()
        if forced:
            if forced not in ("torch", "triton"):
                raise ValueError(
                    f"BLOCKSPARSE_BACKEND must be 'torch' or 'triton', got {forced!r}"
                )
            return forced
        return "triton" if x.is_cuda else "torch"
    return backend


def _describe(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def check_inputs(x: torch.Tensor, weight: BlockSparseWeight, bias: torch.Tensor | None,
                 lora_a: torch.Tensor | None, lora_b: torch.Tensor | None) -> None:
    """Raise a clear error for any operand that does not fit W [N, K]."""
    if not isinstance(weight, BlockSparseWeight):
        raise TypeError(f"weight must be a BlockSparseWeight, got {type(weight).__name__}")
    n, k = weight.shape
    if x.dim() < 1 or x.shape[-1] != k:
        raise ValueError(f"x must have in_features={k} as its last dimension, got {_describe(x)}")
    if x.dtype != weight.dtype or x.device != weight.device:
        raise ValueError(
            f"x and the weight must share dtype and device: x has {_describe(x)}, "
            f"weight values have dtype {weight.dtype}, device {weight.device}"
        )
    if bias is not None and (bias.shape != (n,) or bias.dtype != x.dtype or bias.device != x.device):
        raise ValueError(
            f"bias must have shape ({n},), dtype {x.dtype}, device {x.device}; got {_describe(bias)}"
        )
    if (lora_a is None) != (lora_b is None):
        raise ValueError("lora_a and lora_b must be given together")
    if lora_a is not None:
        r = lora_a.shape[0] if lora_a.dim() == 2 else -1
        if lora_a.dim() != 2 or lora_a.shape[1] != k:
            raise ValueError(f"lora_a must be [r, in_features={k}], got {_describe(lora_a)}")
        if lora_b.shape != (n, r):
            raise ValueError(f"lora_b must be [out_features={n}, r={r}], got {_describe(lora_b)}")
        for name, t in (("lora_a", lora_a), ("lora_b", lora_b)):
            if t.dtype != x.dtype or t.device != x.device:
                raise ValueError(
                    f"{name} must match x (dtype {x.dtype}, device {x.device}); got {_describe(t)}"
                )


# --------------------------------------------------------------------------
# torch backend
# --------------------------------------------------------------------------
def _sparse_matmul_small_m(x: torch.Tensor, weight: BlockSparseWeight) -> torch.Tensor:
    """X [M, K] @ W^T over the stored blocks only, for small M.

    The transposed tiles of block row r, stacked, are the [P*b, b] slab of W^T
    that the row needs; gathering the matching X columns into [M, P*b] turns
    the row into one small GEMM, and a chunk of block rows into one batched
    GEMM. Chunks keep the gathered X in cache, so W is read from memory once.
    """
    m = x.shape[0]
    b = weight.block_size
    n_rows, n_cols = weight.block_grid
    width = weight.ell_index.shape[1]
    out = x.new_zeros(n_rows, m, b)
    if width == 0 or m == 0:
        return out.transpose(0, 1).reshape(m, weight.shape[0])
    x_blocks = x.reshape(m, n_cols, b).transpose(0, 1).contiguous()  # [C, M, b]
    chunk = max(1, _CHUNK_BYTES // (width * b * m * x.element_size()))
    for r0 in range(0, n_rows, chunk):
        r1 = min(r0 + chunk, n_rows)
        gathered = x_blocks[weight.ell_col[r0:r1].long()]  # [ch, P, M, b]
        if weight.rows_uniform:  # the row's tiles are contiguous: a free view
            slab = weight.values[int(weight.crow[r0]):int(weight.crow[r1])]
        else:  # pad short rows with block 0 and zero its X columns
            gathered = gathered * weight.ell_valid[r0:r1, :, None, None]
            slab = weight.values[weight.ell_index[r0:r1].long()]
        gathered = gathered.transpose(1, 2).reshape(r1 - r0, m, width * b)
        torch.bmm(gathered, slab.view(r1 - r0, width * b, b), out=out[r0:r1])
    return out.transpose(0, 1).reshape(m, weight.shape[0])


def sparse_matmul_torch(x: torch.Tensor, weight: BlockSparseWeight) -> torch.Tensor:
    """X [M, K] @ W^T with W block-sparse."""
    if x.shape[0] <= SMALL_M_MAX:
        return _sparse_matmul_small_m(x, weight)
    return F.linear(x, weight.to_dense())


def lora_dropout_mask(shape, p: float, device, generator=None) -> torch.Tensor:
    """Bernoulli keep-mask of the LoRA input dropout (keep with probability 1 - p)."""
    return torch.rand(shape, device=device, generator=generator) >= p


class _BlockSparseLinearTorch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling, dropout_p, keep_mask):
        y = sparse_matmul_torch(x, weight)
        if bias is not None:
            y = y + bias
        lora_in = shrink = None
        if lora_a is not None:
            lora_in = x if keep_mask is None else x * keep_mask / (1.0 - dropout_p)
            shrink = lora_in @ lora_a.t()  # [M, r]
            y = y.addmm_(shrink, lora_b.t(), alpha=scaling)
        ctx.weight, ctx.scaling, ctx.dropout_p = weight, scaling, dropout_p
        ctx.has_bias = bias is not None
        ctx.save_for_backward(lora_in, shrink, lora_a, lora_b, keep_mask)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        lora_in, shrink, lora_a, lora_b, keep_mask = ctx.saved_tensors
        weight, s = ctx.weight, ctx.scaling
        grad_x = grad_bias = grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_y @ weight.to_dense()
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad_y.sum(0)
        if lora_a is not None:
            grad_shrink = (grad_y @ lora_b) * s  # [M, r]
            if ctx.needs_input_grad[3]:
                grad_a = grad_shrink.t() @ lora_in
            if ctx.needs_input_grad[4]:
                grad_b = (grad_y.t() @ shrink) * s
            if ctx.needs_input_grad[0]:
                grad_lora_in = grad_shrink @ lora_a
                if keep_mask is not None:
                    grad_lora_in = grad_lora_in * keep_mask / (1.0 - ctx.dropout_p)
                grad_x = grad_x + grad_lora_in
        return grad_x, None, grad_bias, grad_a, grad_b, None, None, None


# --------------------------------------------------------------------------
# functional API
# --------------------------------------------------------------------------
def block_sparse_linear(
    x: torch.Tensor,
    weight: BlockSparseWeight,
    bias: torch.Tensor | None = None,
    lora_a: torch.Tensor | None = None,
    lora_b: torch.Tensor | None = None,
    scaling: float = 1.0,
    lora_dropout: float = 0.0,
    backend: str = "auto",
) -> torch.Tensor:
    """F.linear(x, W, bias) + scaling * dropout(x) @ lora_a.T @ lora_b.T, W block-sparse.

    x: [..., K]; weight: BlockSparseWeight of shape [N, K]; bias: [N];
    lora_a: [r, K]; lora_b: [N, r] (PEFT's lora_A.weight / lora_B.weight).
    `lora_dropout` is applied (whenever > 0) to the LoRA path's input only, as
    in PEFT; pass 0 in eval mode. W never receives a gradient.
    """
    check_inputs(x, weight, bias, lora_a, lora_b)
    if not 0.0 <= lora_dropout < 1.0:
        raise ValueError(f"lora_dropout must be in [0, 1), got {lora_dropout}")
    if lora_a is None:
        lora_dropout = 0.0
    backend = resolve_backend(backend, x)
    lead, (n, k) = x.shape[:-1], weight.shape
    x2d = x.reshape(-1, k)
    if backend == "triton":
        from .kernels import block_sparse_linear_triton

        y = block_sparse_linear_triton(x2d, weight, bias, lora_a, lora_b, scaling, lora_dropout)
    else:
        keep_mask = None
        if lora_dropout > 0:
            keep_mask = lora_dropout_mask(x2d.shape, lora_dropout, x.device).to(x.dtype)
        y = _BlockSparseLinearTorch.apply(
            x2d, weight, bias, lora_a, lora_b, float(scaling), float(lora_dropout), keep_mask
        )
    return y.reshape(*lead, n)
