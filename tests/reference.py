"""Reference computations and the tolerance rule shared by the tests.

Tolerance rule (as in flash-attention's tests): a kernel's error against an
fp64 reference may be at most 2x the error of PyTorch's own dense op in the
same dtype, plus a small atol.
"""

import torch
import torch.nn.functional as F

ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2, torch.float64: 1e-10}


def random_block_mask(n_block_rows, n_block_cols, density, generator=None, uniform_rows=False):
    """A bool block mask with about `density` of its blocks kept."""
    if uniform_rows:
        keep = round(density * n_block_cols)
        scores = torch.rand(n_block_rows, n_block_cols, generator=generator)
        mask = torch.zeros(n_block_rows, n_block_cols, dtype=torch.bool)
        if keep:
            mask.scatter_(1, scores.topk(keep, dim=1).indices, True)
        return mask
    return torch.rand(n_block_rows, n_block_cols, generator=generator) < density


def linear_lora(x, w_dense, bias=None, lora_a=None, lora_b=None, scaling=1.0, keep_mask=None, p=0.0):
    """The dense computation that block_sparse_linear must equal."""
    y = F.linear(x, w_dense, bias)
    if lora_a is not None:
        lora_in = x if keep_mask is None else x * keep_mask / (1.0 - p)
        y = y + scaling * F.linear(F.linear(lora_in, lora_a), lora_b)
    return y


def assert_matches_reference(out, reference64, torch_out, name="output"):
    """|out - ref| <= 2 |torch_out - ref| + atol, elementwise max; NaN never passes."""
    assert out.shape == reference64.shape, f"{name}: shape {tuple(out.shape)} != {tuple(reference64.shape)}"
    assert not torch.isnan(out).any(), f"{name}: NaN in output"
    err = (out.double() - reference64).abs().max().item() if out.numel() else 0.0
    torch_err = (torch_out.double() - reference64).abs().max().item() if out.numel() else 0.0
    bound = 2 * torch_err + ATOL[out.dtype] * max(1.0, reference64.abs().max().item() if out.numel() else 1.0)
    assert err <= bound, (
        f"{name} ({out.dtype}): max error {err:.3e} exceeds 2 x torch's own {torch_err:.3e} + atol "
        f"(bound {bound:.3e})"
    )
