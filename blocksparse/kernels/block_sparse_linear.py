"""Fused block-sparse linear in Triton: Y = X W^T (+ bias) (+ s * drop(X) A^T B^T).

W [N, K] is a `BlockSparseWeight` (b x b blocks, b in 16/32/64); A [r, K]
and B [N, r] are the LoRA factors (PEFT's lora_A.weight / lora_B.weight).

Reading order: kernels -> launchers -> torch.library ops (with autograd) ->
functional API. Host-side look-up tables: schedule.py; tile configs:
configs.py; ahead-of-time compile specs: aot.py.

The schedule (DESIGN.md section 5). Tokens sit on the MMA's M side. A program
owns a [BM, G*b] output tile: BM tokens times G block rows (a "group"). It
walks the *union* of its rows' block columns KC columns at a time, loads the X
slab of those columns once and multiplies it by a packed [KC*b, G*b] weight
tile; a block absent from one of the rows is a masked load (zero fill, no
memory traffic). G=1 is the plain BSR schedule. Block rows may be permuted
(clustered) so that a group's rows share columns; the epilogue stores each
block row at its true place, so the numerics do not depend on the order.

- Prefill / training (M > 64): G in {1, 2, 4, 8} picked from the union
  densities, BM = 64 or 128 (wgmma on sm_90). A group's absent blocks are
  zero tiles of its union, and 0 * NaN must not reach rows that lack a block:
  a second launch repairs the tiles the first flagged non-finite.
- Decode (M <= 64): G=1 in natural order, so each program streams one block
  row's `values` contiguously; the union is split in SPLIT_K parts when there
  are too few rows to fill the GPU. Split parts write fp32 partials and the
  last part to arrive (an atomic counter) sums them in a fixed order and runs
  the epilogue: one kernel, deterministic.
- LoRA: a small "shrink" kernel computes T = drop(X) A^T first (dropout from a
  Philox seed keyed by the element's linear index m*K + k, one four-output call
  per four neighbours: `_dropout_keep`; the keep bits stored packed, one bit
  per element, for the backward), its K-split partials summed once, by the
  split that finishes last; the main kernel's accumulator starts at the
  expand s * T B^T (one MMA before the main loop), so the LoRA term costs no
  second accumulator and no extra pass over Y.
- Backward: dX = dY W + s * drop'((dY B) A) is the same kernel over
  the transposed block structure (it reads the same `values` tiles
  transposed) starting from the LoRA term with the stored dropout bits; dA is
  a skinny Triton GEMM when dropout is on (it reads the bits) and torch otherwise; dB = s * dY^T T and
  dbias = dY.sum(0) are torch (cuBLAS handles those skinny GEMMs well). When
  the kept blocks are trained, dW at the stored blocks (X^T dY restricted to
  them: an SDD product) is `_sdd_kernel`, one program per KB blocks of a row.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from ..format import BlockSparseWeight
from .configs import (DECODE_MAX_M, DEFAULT_ARCH, DEFAULT_NUM_SMS, SMEM_BYTES, TRITON_BLOCK_SIZES, KernelConfig,
                      dot_precision, grad_a_config, matmul_candidates, matmul_constexprs, matmul_plan,
                      nonfinite_passes, sdd_config, shrink_config)
from .schedule import Schedule, choose_group_size, get_schedule


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# --------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------
# Triton 3.9's interpreter multiplies bf16 dot operands as their raw uint16
# bits. A product of two bf16 values is exact in fp32, so upcasting them there
# computes what the tensor cores do (fp32 accumulation); compiled code is untouched.
_BF16_DOT_IN_FP32 = tl.constexpr(_interpreting())


@triton.jit
def _mma(a, b, acc, DOT_PRECISION: tl.constexpr):
    if _BF16_DOT_IN_FP32:
        if a.dtype == tl.bfloat16:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=DOT_PRECISION)


@triton.jit
def _dropout_keep(seed, row_start, cols, dropout_p, BC: tl.constexpr):
    """Dropout keep bits of the elements row_start[:, None] + cols[None, :] (linear indices
    m*K + k): element i is kept iff lane i % 4 of Philox(seed, i // 4) is >= p as a uniform.
    One four-output Philox call (10 rounds) serves four neighbours, where a call per element
    would spend 10 rounds on each. `cols` runs in aligned quads (c, c+1, c+2, c+3, c % 4 = 0)
    and every row_start is a multiple of 4."""
    tl.static_assert(BC % 4 == 0)
    first = tl.min(tl.reshape(cols, (BC // 4, 4)), axis=1)
    r0, r1, r2, r3 = tl.randint4x(seed, (row_start[:, None] + first[None, :]) // 4)
    bits = tl.interleave(tl.interleave(r0, r2), tl.interleave(r1, r3))
    return tl.uint_to_uniform_float(bits) >= dropout_p


@triton.jit
def _pack_keep_bits(keep, BC: tl.constexpr):
    """[R, BC] keep bits -> [R, BC // 32] int32 words, bit j of word w = column 32 w + j."""
    tl.static_assert(BC % 32 == 0)
    shifted = keep.to(tl.int32) << (tl.arange(0, BC) % 32)[None, :]
    return tl.sum(tl.reshape(shifted, (keep.shape[0], BC // 32, 32)), axis=2)  # distinct bits: sum = or


@triton.jit
def _stored_keep(KEEP_BITS, rows, cols, mask, stride_keep):
    """The keep bits of elements (rows[:, None], cols[None, :]) from the shrink's packed mask."""
    words = tl.load(KEEP_BITS + rows.to(tl.int64)[:, None] * stride_keep + (cols // 32)[None, :], mask=mask,
                    other=0)
    return ((words >> (cols % 32)[None, :]) & 1) != 0


@triton.jit
def _out_columns(group, GROUP_ROWS, BS: tl.constexpr, G: tl.constexpr):
    """(output columns, valid) of a group's [*, G*b] tile: its block rows' true places."""
    nn = tl.arange(0, BS * G)
    out_row = tl.load(GROUP_ROWS + group * G + nn // BS)  # -1 pads the last group
    out_col = tl.max_contiguous(tl.multiple_of(out_row * BS + nn % BS, BS), BS)
    return out_col, out_row >= 0


@triton.jit
def _lora_expand(rm, m_mask, out_col, n_mask, LORA_T, LORA_E, KEEP_BITS, stride_keep, stride_e_out, stride_e_r,
                 lora_rank, scaling, dropout_p, BS: tl.constexpr, G: tl.constexpr, RP: tl.constexpr,
                 LORA_OUT_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """s * T E^T [BM, G*b] in fp32: the LoRA term the accumulator starts from (T [M, RP] is
    the shrink's output, already in the input dtype as the unfused PyTorch path rounds it)."""
    rr = tl.arange(0, RP)
    t = tl.load(LORA_T + rm.to(tl.int64)[:, None] * RP + rr[None, :], mask=m_mask[:, None], other=0.0)
    e = tl.load(LORA_E + out_col[None, :] * stride_e_out + rr[:, None] * stride_e_r,
                mask=n_mask[None, :] & (rr < lora_rank)[:, None], other=0.0)
    lora = _mma(t, e, tl.zeros((t.shape[0], BS * G), dtype=tl.float32), DOT_PRECISION)
    if LORA_OUT_DROPOUT:  # backward: the forward's dropout mask, as the shrink stored it
        keep = _stored_keep(KEEP_BITS, rm, out_col, m_mask[:, None] & n_mask[None, :], stride_keep)
        lora = tl.where(keep, lora / (1.0 - dropout_p), 0.0)
    return scaling * lora


@triton.jit
def _epilogue_store(acc, rm, m_mask, out_col, n_mask, Y, BIAS, stride_ym, HAS_BIAS: tl.constexpr):
    """acc [BM, G*b] (+ bias), stored once at the group's true block rows."""
    if HAS_BIAS:
        acc += tl.load(BIAS + out_col, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    y_ptrs = Y + rm.to(tl.int64)[:, None] * stride_ym + out_col[None, :]
    tl.store(y_ptrs, acc.to(Y.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _bsl_matmul_kernel(
    X, VALUES, Y,
    GROUP_PTR, UNION_COL, UNION_BLOCK, GROUP_ROWS,
    BIAS, LORA_T, LORA_E, KEEP_BITS, PARTIAL, COUNTER, NONFINITE,
    M, N_OUT, num_groups, stride_xm, stride_ym, stride_keep, stride_e_out, stride_e_r, lora_rank,
    scaling, dropout_p,
    BS: tl.constexpr, G: tl.constexpr, KC: tl.constexpr, BM: tl.constexpr,
    SPLIT_K: tl.constexpr, TRANS_W: tl.constexpr, DIRECT_W: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_LORA: tl.constexpr, RP: tl.constexpr, LORA_OUT_DROPOUT: tl.constexpr,
    DOT_PRECISION: tl.constexpr, NONFINITE_PASS: tl.constexpr,
):
    """Y[:, rows of group] = X[:, union columns] @ packed W tile^T, then the epilogue.

    TRANS_W multiplies by W's blocks instead (the backward dX = dY W): the
    LUTs then describe the transposed structure and each tile is read transposed.
    DIRECT_W (forward, G=1, BSR order: union entry u is block u) reads the
    tiles as one contiguous stream with no block-index LUT: the decode path.
    NONFINITE_PASS (grouped schedules, see `_sparse_matmul`): 1 flags the tiles
    that came out non-finite in NONFINITE; 2 recomputes only the flagged ones.
    HAS_LORA starts the accumulator at the LoRA term (split 0 of a split union): one
    MMA before the main loop, so no second [BM, G*b] accumulator is live at any time.
    """
    BN: tl.constexpr = BS * G
    BK: tl.constexpr = BS * KC
    pid = tl.program_id(0)
    m_tiles = tl.cdiv(M, BM)
    # Token tiles vary fastest: programs running together share a group's
    # weight tiles and the whole (L2-resident) X.
    pid_m = pid % m_tiles
    pid_k = (pid // m_tiles) % SPLIT_K
    group = pid // (m_tiles * SPLIT_K)

    rm = pid_m * BM + tl.arange(0, BM)
    m_mask = rm < M
    kk = tl.arange(0, BK)
    nn = tl.arange(0, BN)
    k_in, n_in = kk % BS, nn % BS  # position inside a block
    # values[blk] holds the W^T tile (rows = in, columns = out; format.py).
    if TRANS_W:  # the tile of W[o, i] is values[blk, o, i]: read transposed
        w_in_block = n_in[None, :] * BS + k_in[:, None]
    else:  # the tile of W^T[i, o] is values[blk, i, o]: read as it lies
        w_in_block = k_in[:, None] * BS + n_in[None, :]

    tile = group * m_tiles + pid_m
    if NONFINITE_PASS == 2:
        if tl.load(NONFINITE + tile) == 0:
            return
    u_begin = tl.load(GROUP_PTR + group)
    u_end = tl.load(GROUP_PTR + group + 1)
    if SPLIT_K > 1:
        per_split = tl.cdiv(tl.cdiv(u_end - u_begin, SPLIT_K), KC) * KC
        u_begin = u_begin + pid_k * per_split
        u_end = tl.minimum(u_end, u_begin + per_split)

    x_rows = X + rm.to(tl.int64)[:, None] * stride_xm
    cc = tl.arange(0, KC)
    gg = tl.arange(0, G)
    if NONFINITE_PASS == 2:  # which group rows of each token have a stored block reading NaN or inf
        hit = tl.zeros((BM, G), dtype=tl.int32)
        for u in tl.range(u_begin, u_end, KC, num_stages=1):
            c_valid = u + cc < u_end
            col = tl.load(UNION_COL + u + cc, mask=c_valid, other=0)
            xk = tl.reshape(col[:, None] * BS + tl.arange(0, BS)[None, :], (BK,))
            k_valid = tl.reshape(tl.broadcast_to(c_valid[:, None], (KC, BS)), (BK,))
            xf = tl.load(x_rows + xk[None, :], mask=m_mask[:, None] & k_valid[None, :], other=0.0).to(tl.float32)
            bad_col = tl.max(tl.reshape((xf - xf != 0.0).to(tl.int32), (BM, KC, BS)), axis=2)
            present = tl.load(UNION_BLOCK + (u + cc)[:, None] * G + gg[None, :],
                              mask=c_valid[:, None], other=-1) >= 0
            hit = tl.maximum(hit, tl.max(bad_col[:, :, None] * present.to(tl.int32)[None, :, :], axis=1))
    out_col, n_mask = _out_columns(group, GROUP_ROWS, BS, G)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    if HAS_LORA:  # split 0 carries the term; the others multiply masked-off zeros (no traffic): a
        # branch here spilled on sm_80 (decode-sized dX with dropout, split in two). The split test
        # is a [BM] vector: the interpreter rejects a scalar bool in a load mask.
        acc = _lora_expand(rm, m_mask & (rm * 0 + pid_k == 0), out_col, n_mask, LORA_T, LORA_E, KEEP_BITS, stride_keep,
                           stride_e_out, stride_e_r, lora_rank, scaling, dropout_p, BS, G, RP, LORA_OUT_DROPOUT,
                           DOT_PRECISION)
    for u in range(u_begin, u_end, KC):
        # The LUT entries of this step: KC union columns x G rows, expanded to
        # the [BK, BN] tile by broadcasting (no per-element gather).
        c_valid = u + cc < u_end
        col = tl.load(UNION_COL + u + cc, mask=c_valid, other=0)
        xk = tl.reshape(col[:, None] * BS + tl.arange(0, BS)[None, :], (BK,))
        xk = tl.max_contiguous(tl.multiple_of(xk, BS), BS)
        k_valid = tl.reshape(tl.broadcast_to(c_valid[:, None], (KC, BS)), (BK,))
        x = tl.load(x_rows + xk[None, :], mask=m_mask[:, None] & k_valid[None, :], other=0.0)
        # Masked-off tiles still form addresses: clamp them to real blocks (the last step's
        # tail, absent blocks' -1), so no address lies before or past `values`.
        if DIRECT_W:  # union entry u is block u: the step's tiles lie contiguously
            blk_k = tl.minimum(u + kk // BS, u_end - 1)
            w = tl.load(VALUES + blk_k[:, None] * (BS * BS) + k_in[:, None] * BS + nn[None, :],
                        mask=k_valid[:, None], other=0.0)
        else:
            blk_cg = tl.load(UNION_BLOCK + (u + cc)[:, None] * G + gg[None, :],
                             mask=c_valid[:, None], other=-1)
            blk = tl.reshape(tl.broadcast_to(blk_cg[:, None, :, None], (KC, BS, G, BS)), (BK, BN))
            w = tl.load(VALUES + tl.maximum(blk, 0) * (BS * BS) + w_in_block, mask=blk >= 0, other=0.0)
        if NONFINITE_PASS == 2:  # multiply as if the non-finite inputs were 0
            xf = x.to(tl.float32)  # (the interpreter's bf16 x - x is not IEEE)
            x = tl.where(xf - xf == 0.0, x, 0.0).to(x.dtype)
        acc = _mma(x, w, acc, DOT_PRECISION)

    # Pruned weights do not exist: a group's absent blocks are zero tiles of its union, and
    # 0 * NaN would carry a non-finite input to rows that lack its block. Pass 1 only flags
    # the tile (inf - inf and NaN - NaN are NaN); pass 2 makes NaN exactly the outputs whose
    # stored blocks read one, the rest computed as if the non-finite inputs were 0.
    if NONFINITE_PASS == 1:
        if tl.sum(((acc - acc) != 0.0).to(tl.int32)) > 0:
            tl.store(NONFINITE + tile, 1)
    if NONFINITE_PASS == 2:
        bad = tl.reshape(tl.broadcast_to(hit[:, :, None], (BM, G, BS)), (BM, BN))
        acc = tl.where(bad > 0, float("nan"), acc)

    if SPLIT_K > 1:
        # Each split stores an fp32 partial; the last to arrive sums all of
        # them in split order (deterministic), resets the counter and stores.
        n_tiles = num_groups * m_tiles
        local = tl.arange(0, BM)[:, None] * BN + nn[None, :]
        tl.store(PARTIAL + (pid_k * n_tiles + tile).to(tl.int64) * (BM * BN) + local, acc)
        tl.debug_barrier()
        arrived = tl.atomic_add(COUNTER + tile, 1, sem="acq_rel", scope="gpu")
        if arrived == SPLIT_K - 1:
            acc = tl.zeros((BM, BN), dtype=tl.float32)
            for s in tl.static_range(SPLIT_K):
                acc += tl.load(PARTIAL + (s * n_tiles + tile).to(tl.int64) * (BM * BN) + local,
                               cache_modifier=".cg")
            tl.atomic_xchg(COUNTER + tile, 0)
            _epilogue_store(acc, rm, m_mask, out_col, n_mask, Y, BIAS, stride_ym, HAS_BIAS)
    else:
        _epilogue_store(acc, rm, m_mask, out_col, n_mask, Y, BIAS, stride_ym, HAS_BIAS)


@triton.jit
def _lora_shrink_kernel(X, A, T, PARTIAL, COUNTER, SEED, KEEP_BITS, M, K, lora_rank, stride_xm, stride_a_r,
                        stride_a_k, stride_keep, dropout_p, BM: tl.constexpr, BK: tl.constexpr, RP: tl.constexpr,
                        SPLITS: tl.constexpr, HAS_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """T = drop(X) @ A^T [M, RP] in X's dtype (columns past the rank are zero).

    K is split SPLITS ways to fill the GPU when M is small; each split stores
    an fp32 partial and the last to arrive at its token tile (an atomic
    counter) sums them in split order and stores T once, so every program of
    the main kernel reads one T tile. Dropout keeps element (m, k) iff
    rand(seed, m*K + k) >= p; the keep bits are stored packed, 32 to an int32
    word (KEEP_BITS [M, ceil(K/32)]), for the backward to read instead of
    regenerating them twice (dX's LoRA term and dA).
    """
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM)
    m_mask = rm < M
    rr = tl.arange(0, RP)
    k_per_split = tl.cdiv(tl.cdiv(K, BK), SPLITS) * BK
    k_begin = pid_s * k_per_split
    k_end = tl.minimum(K, k_begin + k_per_split)
    acc = tl.zeros((BM, RP), dtype=tl.float32)
    if HAS_DROPOUT:
        seed = tl.load(SEED)
    for k in range(k_begin, k_end, BK):
        rk = tl.max_contiguous(tl.multiple_of(k + tl.arange(0, BK), BK), BK)
        k_mask = rk < k_end
        x = tl.load(X + rm.to(tl.int64)[:, None] * stride_xm + rk[None, :],
                    mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        if HAS_DROPOUT:
            keep = _dropout_keep(seed, rm.to(tl.int64) * K, rk, dropout_p, BK)
            x = tl.where(keep, x.to(tl.float32) / (1.0 - dropout_p), 0.0).to(x.dtype)
            words = k // 32 + tl.arange(0, BK // 32)  # k is a multiple of BK: whole words
            tl.store(KEEP_BITS + rm.to(tl.int64)[:, None] * stride_keep + words[None, :], _pack_keep_bits(keep, BK),
                     mask=m_mask[:, None] & (words * 32 < k_end)[None, :])
        a = tl.load(A + rr[None, :] * stride_a_r + rk[:, None] * stride_a_k,
                    mask=(rr < lora_rank)[None, :] & k_mask[:, None], other=0.0)
        acc = _mma(x, a, acc, DOT_PRECISION)
    t_ptrs = T + rm.to(tl.int64)[:, None] * RP + rr[None, :]
    if SPLITS == 1:
        tl.store(t_ptrs, acc.to(T.dtype.element_ty), mask=m_mask[:, None])
    else:
        local = rm.to(tl.int64)[:, None] * RP + rr[None, :]
        # The partial buffer is [SPLITS, M tiles * BM, RP]; a split's offset in int64, as every
        # row offset here: SPLITS * M * RP passes 2^31 from ~2M tokens at 16 splits of rank 64.
        split_elems = (tl.cdiv(M, BM) * BM).to(tl.int64) * RP
        tl.store(PARTIAL + pid_s * split_elems + local, acc)
        tl.debug_barrier()
        arrived = tl.atomic_add(COUNTER + pid_m, 1, sem="acq_rel", scope="gpu")
        if arrived == SPLITS - 1:
            acc = tl.zeros((BM, RP), dtype=tl.float32)
            for s in tl.static_range(SPLITS):
                acc += tl.load(PARTIAL + s * split_elems + local, cache_modifier=".cg")
            tl.atomic_xchg(COUNTER + pid_m, 0)
            tl.store(t_ptrs, acc.to(T.dtype.element_ty), mask=m_mask[:, None])


@triton.jit
def _lora_grad_a_kernel(GS, X, PARTIAL, KEEP_BITS, M, K, lora_rank, stride_gm, stride_xm, stride_keep, dropout_p,
                        BM: tl.constexpr, BK: tl.constexpr, RP: tl.constexpr, SPLITS: tl.constexpr,
                        DOT_PRECISION: tl.constexpr):
    """PARTIAL[split] = GS[split's rows]^T @ drop(X)[split's rows], fp32 [SPLITS, RP, K].

    dA = s (dY B)^T drop(X) with the forward's dropout mask read from the shrink's
    packed bits (one bit per element).
    """
    pid_k = tl.program_id(0)
    pid_s = tl.program_id(1)
    rk = tl.max_contiguous(tl.multiple_of(pid_k * BK + tl.arange(0, BK), BK), BK)
    k_mask = rk < K
    rr = tl.arange(0, RP)
    m_per_split = tl.cdiv(tl.cdiv(M, BM), SPLITS) * BM
    m_begin = pid_s * m_per_split
    m_end = tl.minimum(M, m_begin + m_per_split)
    acc = tl.zeros((RP, BK), dtype=tl.float32)
    for m in range(m_begin, m_end, BM):
        rm = m + tl.arange(0, BM)
        m_mask = rm < m_end
        g = tl.load(GS + rm.to(tl.int64)[None, :] * stride_gm + rr[:, None],
                    mask=m_mask[None, :] & (rr < lora_rank)[:, None], other=0.0)
        x = tl.load(X + rm.to(tl.int64)[:, None] * stride_xm + rk[None, :],
                    mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        keep = _stored_keep(KEEP_BITS, rm, rk, m_mask[:, None] & k_mask[None, :], stride_keep)
        x = tl.where(keep, x.to(tl.float32) / (1.0 - dropout_p), 0.0).to(x.dtype)
        acc = _mma(g, x, acc, DOT_PRECISION)
    tl.store(PARTIAL + (pid_s * RP + rr)[:, None] * K + rk[None, :], acc, mask=k_mask[None, :])


@triton.jit
def _sdd_kernel(X, GRAD_Y, GRAD_V, CROW, COL, ROW_PERM, M, stride_xm, stride_gm,
                BS: tl.constexpr, KB: tl.constexpr, BM: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """dW at the stored blocks: GRAD_V[i] = X[:, col_i block]^T dY[:, row_i block] [b, b].

    Program (r, j) owns storage row r's blocks j*KB .. j*KB + KB - 1: a contiguous
    [KB*b, b] stretch of `values`' layout, accumulated over the tokens as
    gathered X^T [KB*b, BM] x dY [BM, b]. Each tile reads only its own X columns
    and dY rows, so a non-finite input reaches only the blocks that read it.
    """
    r = tl.program_id(0)
    start = tl.load(CROW + r)
    count = tl.load(CROW + r + 1) - start
    first = tl.program_id(1) * KB
    if first < count:
        kk = tl.arange(0, KB * BS)
        slot = first + kk // BS
        k_mask = slot < count
        col = tl.load(COL + start + slot, mask=k_mask, other=0)
        x_cols = tl.max_contiguous(tl.multiple_of(col * BS + kk % BS, BS), BS)
        jj = tl.arange(0, BS)
        y_cols = tl.load(ROW_PERM + r) * BS + jj
        acc = tl.zeros((KB * BS, BS), dtype=tl.float32)
        for m0 in range(0, M, BM):
            rm = m0 + tl.arange(0, BM)
            m_mask = rm < M
            x = tl.load(X + rm.to(tl.int64)[:, None] * stride_xm + x_cols[None, :],
                        mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            g = tl.load(GRAD_Y + rm.to(tl.int64)[:, None] * stride_gm + y_cols[None, :],
                        mask=m_mask[:, None], other=0.0)
            acc = _mma(tl.trans(x), g, acc, DOT_PRECISION)
        out = GRAD_V + (start + first).to(tl.int64) * BS * BS + kk[:, None] * BS + jj[None, :]
        tl.store(out, acc.to(GRAD_V.dtype.element_ty), mask=k_mask[:, None])


@triton.jit
def _dropout_keep_kernel(SEED, KEEP, numel, dropout_p, BLOCK: tl.constexpr):
    """KEEP[i] = the keep bit of element i (`_dropout_keep`): the mask every kernel above uses."""
    start = tl.program_id(0).to(tl.int64) * BLOCK
    offs = start + tl.arange(0, BLOCK)
    keep = tl.reshape(_dropout_keep(tl.load(SEED), tl.full((1,), start, tl.int64), tl.arange(0, BLOCK), dropout_p,
                                    BLOCK), (BLOCK,))
    tl.store(KEEP + offs, keep.to(KEEP.dtype.element_ty), mask=offs < numel)


# --------------------------------------------------------------------------
# configs: one function per kernel, per regime; no GPU query at import
# --------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _device_limits(device: torch.device) -> tuple[int, int, int]:
    """(SM count, opt-in shared memory per block, compute capability as 80/90) of a CUDA device;
    an H100's SMs and capability in the interpreter (A100's shared memory: the smaller)."""
    if device.type != "cuda":
        return DEFAULT_NUM_SMS, SMEM_BYTES[80], DEFAULT_ARCH
    props = torch.cuda.get_device_properties(device)
    smem = getattr(props, "shared_memory_per_block_optin", SMEM_BYTES[80])
    return props.multi_processor_count, int(smem), props.major * 10 + props.minor


# Autotuning, opt-in (BLOCKSPARSE_AUTOTUNE=1, CUDA only): the first call of a
# key times `matmul_candidates` with triton.testing.do_bench and keeps the
# fastest for the process. Off by default: every candidate compiles on first use.
# AUTOTUNE_RECORDS keeps every candidate's time per key: the tiles compared on the
# device itself (bench/kernels.py writes them out).
_TUNED: dict = {}
AUTOTUNE_RECORDS: list[dict] = []


def _autotune_enabled(device: torch.device) -> bool:
    return (device.type == "cuda" and os.environ.get("BLOCKSPARSE_AUTOTUNE", "0") == "1"
            and not torch.cuda.is_current_stream_capturing())


def _time_candidates(candidates: list, run) -> list[float]:
    """Milliseconds of run(candidate) for each candidate; inf for one that fails to compile or
    launch (e.g. out of shared memory on a GPU the configs do not know), unless all do."""
    times, error = [], None
    for c in candidates:
        try:
            times.append(triton.testing.do_bench(lambda c=c: run(c), warmup=5, rep=20))
        except Exception as err:  # noqa: BLE001  (any compile or launch failure rules the candidate out)
            times.append(float("inf"))
            error = err
    if error is not None and min(times) == float("inf"):
        raise error
    return times


def _plan_label(cfg: KernelConfig, split_k: int) -> str:
    cx = cfg.constexprs
    return (f"{cx['BM']}x{cx['BS'] * cx['G']} KC={cx['KC']} w{cfg.num_warps} s{cfg.num_stages}"
            + (f" split {split_k}" if split_k > 1 else ""))


# --------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------
def _keep_bits_shape(m: int, k: int, dropout: bool) -> tuple[int, int]:
    """Shape of the packed dropout keep mask of an [m, k] input: 32 bits per int32 word."""
    return (m, -(-k // 32)) if dropout else (0, 0)


def _lora_shrink(x: torch.Tensor, a: torch.Tensor, stride_a_r: int, stride_a_k: int, rank: int,
                 seed: torch.Tensor | None, dropout_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(T = drop(x) @ A^T [M, RP] in x's dtype (RP = the rank padded to a power of two >= 16),
    the keep bits packed [M, ceil(K/32)] int32, empty without dropout); A given by strides as [rank, K]."""
    m, k = x.shape
    rp = max(16, triton.next_power_of_2(rank))
    num_sms, _, _ = _device_limits(x.device)
    cfg, splits = shrink_config(m, k, rp, num_sms)
    bm = cfg.constexprs["BM"]
    m_tiles = triton.cdiv(m, bm)
    t = torch.empty((m, rp), dtype=x.dtype, device=x.device)
    partial = counter = t
    keep_bits = torch.empty(_keep_bits_shape(m, k, dropout_p > 0), dtype=torch.int32, device=x.device)
    if splits > 1:
        partial = torch.empty((splits, m_tiles * bm, rp), dtype=torch.float32, device=x.device)
        counter = torch.zeros(m_tiles, dtype=torch.int32, device=x.device)
    _lora_shrink_kernel[(m_tiles, splits)](
        x, a, t, partial, counter, seed if seed is not None else t, keep_bits, m, k, rank, x.stride(0),
        stride_a_r, stride_a_k, keep_bits.stride(0), float(dropout_p), HAS_DROPOUT=dropout_p > 0,
        DOT_PRECISION=dot_precision(x.dtype), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        **cfg.constexprs)
    return t, keep_bits


def _sparse_matmul(x: torch.Tensor, values: torch.Tensor, luts: list[torch.Tensor], n_out: int,
                   *, transposed: bool, bias: torch.Tensor | None = None,
                   lora_t: torch.Tensor | None = None, lora_e: torch.Tensor | None = None,
                   e_strides: tuple[int, int] = (0, 0), lora_rank: int = 0, scaling: float = 1.0,
                   out_dropout_p: float = 0.0, keep_bits: torch.Tensor | None = None,
                   split_k: int = 0) -> torch.Tensor:
    """Y [M, n_out] = x @ W_view^T (+ bias) (+ scaling * drop'(T E^T)) with `_bsl_matmul_kernel`
    (one launch; two for grouped schedules, the second a non-finite repair pass); drop' applies
    the packed keep bits [M, ceil(n_out/32)] with out_dropout_p."""
    group_ptr, union_col, union_block, group_rows = luts
    m = x.shape[0]
    bs, groups, g = values.shape[1], group_rows.shape[0], group_rows.shape[1]
    y = torch.empty((m, n_out), dtype=x.dtype, device=x.device)
    if m == 0:
        return y
    num_sms, smem, arch = _device_limits(x.device)
    forced_split = split_k > 0
    cfg, split_k, union_steps = matmul_plan(m, bs, g, x.element_size(), groups, union_col.numel() - 1,
                                            out_dropout=out_dropout_p > 0, smem_bytes=smem, num_sms=num_sms,
                                            arch=arch, split_k=split_k)
    rp = lora_t.shape[1] if lora_t is not None else 16

    def launch(cfg: KernelConfig, split_k: int) -> None:
        bm = cfg.constexprs["BM"]
        m_tiles = triton.cdiv(m, bm)
        partial = counter = nonfinite = y
        if split_k > 1:
            partial = torch.empty((split_k, groups * m_tiles, bm, bs * g), dtype=torch.float32,
                                  device=x.device)
            counter = torch.zeros(groups * m_tiles, dtype=torch.int32, device=x.device)
        if g > 1:
            nonfinite = torch.zeros(groups * m_tiles, dtype=torch.int32, device=x.device)
        # A grouped schedule runs a second pass over the tiles the first flagged non-finite:
        # nothing but an early exit when the input is finite (one more launch).
        for nonfinite_pass in nonfinite_passes(g):
            _bsl_matmul_kernel[(m_tiles * split_k * groups,)](
                x, values, y, group_ptr, union_col, union_block, group_rows,
                bias if bias is not None else y, lora_t if lora_t is not None else y,
                lora_e if lora_e is not None else y, keep_bits if keep_bits is not None else y, partial, counter,
                nonfinite, m, n_out, groups, x.stride(0), y.stride(0),
                keep_bits.stride(0) if keep_bits is not None else 0, e_strides[0], e_strides[1], lora_rank,
                float(scaling), float(out_dropout_p), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                **matmul_constexprs(cfg, split_k=split_k, transposed=transposed, has_bias=bias is not None,
                                    has_lora=lora_t is not None, rank_padded=rp, out_dropout=out_dropout_p > 0,
                                    precision=dot_precision(x.dtype), nonfinite_pass=nonfinite_pass))

    if not forced_split and _autotune_enabled(x.device) and groups:
        key = (cfg.regime, triton.next_power_of_2(m), n_out, x.shape[1], union_col.numel(), bs, g, arch,
               transposed, x.dtype, bias is not None, lora_t is not None, out_dropout_p > 0)
        if key not in _TUNED:
            candidates = matmul_candidates(cfg, split_k, union_steps, x.element_size(), smem, m=m, arch=arch)
            _TUNED[key] = candidates[0]
            if len(candidates) > 1:
                times = _time_candidates(candidates, lambda c: launch(*c))
                _TUNED[key] = candidates[min(range(len(candidates)), key=times.__getitem__)]
                AUTOTUNE_RECORDS.append({
                    "regime": cfg.regime, "m": m, "n": n_out, "k": x.shape[1], "group_size": g,
                    "union": (union_col.numel() - 1) / max(groups * x.shape[1] // bs, 1),
                    "transposed": transposed, "dtype": str(x.dtype).removeprefix("torch."),
                    "bias": bias is not None, "lora": lora_t is not None, "dropout": out_dropout_p > 0,
                    "chosen": _plan_label(*_TUNED[key]),
                    "candidates": [{"config": _plan_label(*c), "ms": t} for c, t in zip(candidates, times)]})
        cfg, split_k = _TUNED[key]
    launch(cfg, split_k)
    return y


def _lora_grad_a_dropout(gs: torch.Tensor, x: torch.Tensor, keep_bits: torch.Tensor,
                         dropout_p: float) -> torch.Tensor:
    """gs^T @ drop(x) [r, K] with the forward's dropout mask read from its packed keep bits."""
    m, k = x.shape
    rank = gs.shape[1]
    rp = max(16, triton.next_power_of_2(rank))
    num_sms, _, _ = _device_limits(x.device)
    cfg = grad_a_config(m, k, rp, num_sms, x.element_size())
    splits = cfg.constexprs["SPLITS"]
    partial = torch.empty((splits, rp, k), dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(k, cfg.constexprs["BK"]), splits)
    _lora_grad_a_kernel[grid](
        gs, x, partial, keep_bits, m, k, rank, gs.stride(0), x.stride(0), keep_bits.stride(0), float(dropout_p),
        DOT_PRECISION=dot_precision(x.dtype), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        **cfg.constexprs)
    return partial.sum(0)[:rank].to(x.dtype)


def _sparse_grad_values(x: torch.Tensor, grad_y: torch.Tensor, values: torch.Tensor,
                        w_luts: list[torch.Tensor]) -> torch.Tensor:
    """dW at the stored blocks, in `values`' layout [nnz, b, b]: one `_sdd_kernel` launch.
    w_luts: the weight's (crow, col, row_perm)."""
    crow, col, row_perm = w_luts
    grad = torch.zeros_like(values)
    m, bs = x.shape[0], values.shape[1]
    if m == 0 or values.shape[0] == 0:
        return grad
    cfg = sdd_config(m, bs)
    # Enough programs for a row holding every block column (no host sync for the widest
    # row); the ones past a row's blocks return at once.
    grid = (crow.numel() - 1, triton.cdiv(x.shape[1] // bs, cfg.constexprs["KB"]))
    _sdd_kernel[grid](x, grad_y, grad, crow, col, row_perm, m, x.stride(0), grad_y.stride(0),
                      BS=bs, DOT_PRECISION=dot_precision(x.dtype), num_warps=cfg.num_warps,
                      num_stages=cfg.num_stages, **cfg.constexprs)
    return grad


def philox_keep_mask(seed: torch.Tensor, m: int, k: int, p: float,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The exact [m, k] keep-mask (1/0 in `dtype`) the kernels derive from `seed` for dropout p.

    Feed it to the torch backend (`blocksparse.ops.linear_torch(..., keep_mask=...)`)
    to compare a dropout run element for element.
    """
    keep = torch.empty((m, k), dtype=torch.float32, device=seed.device)
    block = 1024
    _dropout_keep_kernel[(triton.cdiv(m * k, block),)](seed, keep, m * k, float(p), BLOCK=block)
    return keep.to(dtype)


def new_dropout_seed(device: torch.device) -> torch.Tensor:
    """A fresh Philox seed (int64 [1]) from torch's generator on `device`."""
    return torch.randint(0, 2**31 - 1, (1,), dtype=torch.int64, device=device)


# --------------------------------------------------------------------------
# torch.library ops: torch.compile traces through them (fake impls below)
# --------------------------------------------------------------------------
def _aligned(t: torch.Tensor) -> torch.Tensor:
    """`t` itself, or a copy when its rows do not start on 16 bytes or its row stride is not a
    multiple of 16 elements: the JIT would compile such a view to an unvectorised, unpipelined
    variant, and not the one the compile report checks. (Inside the ops, where torch.compile
    does not trace: a data pointer is opaque to it.)"""
    if t.data_ptr() % 16 or (t.dim() == 2 and t.shape[0] > 1 and t.stride(0) % 16):
        return t.clone(memory_format=torch.contiguous_format)
    return t


@torch.library.custom_op("blocksparse::linear", mutates_args=())
def _linear_op(x: torch.Tensor, values: torch.Tensor, luts: list[torch.Tensor],
               t_luts: list[torch.Tensor], w_luts: list[torch.Tensor], bias: torch.Tensor | None,
               lora_a: torch.Tensor | None,
               lora_b: torch.Tensor | None, seed: torch.Tensor | None, n_out: int, scaling: float,
               dropout_p: float, split_k: int, save_shrink: bool
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(Y, T, keep bits) with T = drop(x) A^T [M, r] kept for the backward (empty unless
    save_shrink) and the dropout keep mask packed [M, ceil(K/32)] int32 (empty without
    LoRA dropout). w_luts: the weight's (crow, col, row_perm) when its values are trained, else empty."""
    if lora_a is not None and dropout_p > 0 and seed is None:
        raise ValueError(f"LoRA dropout p={dropout_p} needs a seed tensor (int64 [1]), got None")
    x = _aligned(x)
    lora_t = lora_e = None
    rank = 0
    shrink = x.new_empty((0, 0))
    has_dropout = lora_a is not None and dropout_p > 0
    keep_bits = torch.empty(_keep_bits_shape(*x.shape, has_dropout), dtype=torch.int32, device=x.device)
    if x.shape[0] == 0:
        y = x.new_empty((0, n_out))
        return y, x.new_empty((0, lora_a.shape[0])) if lora_a is not None and save_shrink else shrink, keep_bits
    if lora_a is not None:
        rank = lora_a.shape[0]
        lora_t, keep_bits = _lora_shrink(x, lora_a, lora_a.stride(0), lora_a.stride(1), rank, seed,
                                         dropout_p if has_dropout else 0.0)
        lora_e = lora_b
        if save_shrink:
            shrink = lora_t[:, :rank].contiguous()
    y = _sparse_matmul(x, values, luts, n_out, transposed=False, bias=bias, lora_t=lora_t,
                       lora_e=lora_e,
                       e_strides=(lora_b.stride(0), lora_b.stride(1)) if lora_b is not None else (0, 0),
                       lora_rank=rank, scaling=scaling, split_k=split_k)
    return y, shrink, keep_bits


@_linear_op.register_fake
def _linear_fake(x, values, luts, t_luts, w_luts, bias, lora_a, lora_b, seed, n_out, scaling, dropout_p,
                 split_k, save_shrink):
    shrink_shape = (x.shape[0], lora_a.shape[0]) if lora_a is not None and save_shrink else (0, 0)
    keep_shape = _keep_bits_shape(*x.shape, lora_a is not None and dropout_p > 0)
    return (x.new_empty((x.shape[0], n_out)), x.new_empty(shrink_shape),
            x.new_empty(keep_shape, dtype=torch.int32))


@torch.library.custom_op("blocksparse::linear_backward", mutates_args=())
def _linear_backward_op(grad_y: torch.Tensor, x: torch.Tensor, values: torch.Tensor,
                        t_luts: list[torch.Tensor], w_luts: list[torch.Tensor], lora_a: torch.Tensor | None,
                        lora_b: torch.Tensor | None, shrink: torch.Tensor | None,
                        keep_bits: torch.Tensor | None, scaling: float, dropout_p: float, split_k: int,
                        need_x: bool, need_w: bool, need_a: bool, need_b: bool
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dX, dW at the stored blocks, dA, dB); a gradient that is not needed comes back empty."""
    x, grad_y = _aligned(x), _aligned(grad_y)
    k = x.shape[1]
    grad_x, grad_w, grad_a, grad_b = (x.new_empty((0,)) for _ in range(4))
    lora_u = None
    rank = lora_a.shape[0] if lora_a is not None else 0
    if need_w:
        grad_w = _sparse_grad_values(x, grad_y, values, w_luts)
    if x.shape[0] == 0:  # no tokens: zero gradients of the right shapes
        return (x.new_zeros(x.shape) if need_x else grad_x, grad_w,
                torch.zeros_like(lora_a) if need_a else grad_a, torch.zeros_like(lora_b) if need_b else grad_b)
    if lora_a is not None and (need_x or need_a):
        # U = dY B: the shrink kernel over dY with B^T as its [r, N] factor.
        lora_u, _ = _lora_shrink(grad_y, lora_b, lora_b.stride(1), lora_b.stride(0), rank, None, 0.0)
    if need_x:
        grad_x = _sparse_matmul(
            grad_y, values, t_luts, k, transposed=True, lora_t=lora_u, lora_e=lora_a,
            e_strides=(lora_a.stride(1), lora_a.stride(0)) if lora_a is not None else (0, 0),
            lora_rank=rank, scaling=scaling, out_dropout_p=dropout_p, keep_bits=keep_bits, split_k=split_k)
    if need_a:
        gs = lora_u[:, :rank] * scaling
        if dropout_p > 0:
            grad_a = _lora_grad_a_dropout(gs, x, keep_bits, dropout_p)
        else:
            grad_a = gs.t() @ x
    if need_b:
        grad_b = (grad_y.t() @ shrink) * scaling
    return grad_x, grad_w, grad_a, grad_b


@_linear_backward_op.register_fake
def _linear_backward_fake(grad_y, x, values, t_luts, w_luts, lora_a, lora_b, shrink, keep_bits, scaling,
                          dropout_p, split_k, need_x, need_w, need_a, need_b):
    empty = x.new_empty((0,))
    return (x.new_empty(x.shape) if need_x else empty, values.new_empty(values.shape) if need_w else empty,
            lora_a.new_empty(lora_a.shape) if need_a else empty,
            lora_b.new_empty(lora_b.shape) if need_b else empty)


def _setup_context(ctx, inputs, output):
    (x, values, luts, t_luts, w_luts, bias, lora_a, lora_b, seed, n_out, scaling, dropout_p,
     split_k, save_shrink) = inputs
    ctx.num_luts, ctx.num_t_luts, ctx.num_w_luts = len(luts), len(t_luts), len(w_luts)
    ctx.scaling, ctx.dropout_p, ctx.split_k = scaling, dropout_p, split_k
    ctx.has_bias, ctx.has_lora = bias is not None, lora_a is not None
    ctx.mark_non_differentiable(output[2])
    ctx.save_for_backward(x, values, lora_a, lora_b, output[1], output[2], *t_luts, *w_luts)


def _backward(ctx, grad_y, _grad_shrink, _grad_keep_bits):
    x, values, lora_a, lora_b, shrink, keep_bits, *luts = ctx.saved_tensors
    t_luts, w_luts = luts[:ctx.num_t_luts], luts[ctx.num_t_luts:]
    need = ctx.needs_input_grad
    need_x, need_w, need_bias = need[0], need[1], ctx.has_bias and need[5]
    need_a, need_b = ctx.has_lora and need[6], ctx.has_lora and need[7]
    grad_y = grad_y.contiguous()
    grad_x = grad_w = grad_a = grad_b = grad_bias = None
    if need_x or need_w or need_a or need_b:
        if need_x and not t_luts:
            raise RuntimeError("blocksparse: x needs a gradient but the forward ran without "
                               "the transposed schedule (x did not require grad then)")
        if need_w and not w_luts:
            raise RuntimeError("blocksparse: the block values need a gradient but the forward ran "
                               "without the structure (they did not require grad then)")
        grad_x, grad_w, grad_a, grad_b = torch.ops.blocksparse.linear_backward(
            grad_y, x, values, t_luts, w_luts, lora_a, lora_b, shrink, keep_bits, ctx.scaling,
            ctx.dropout_p, ctx.split_k, need_x, need_w, need_a, need_b)
    if need_bias:
        grad_bias = grad_y.sum(0)
    return (grad_x if need_x else None, grad_w if need_w else None, [None] * ctx.num_luts,
            [None] * ctx.num_t_luts, [None] * ctx.num_w_luts, grad_bias, grad_a if need_a else None,
            grad_b if need_b else None, None, None, None, None, None, None)


_linear_op.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------
# functional API
# --------------------------------------------------------------------------
def check_triton_support(x: torch.Tensor, weight: BlockSparseWeight) -> None:
    """Raise a clear error for what the Triton kernels cannot run."""
    if weight.block_size not in TRITON_BLOCK_SIZES:
        raise ValueError(
            f"the Triton kernels need block_size >= 16 (tl.dot's smallest tile is 16), "
            f"one of {TRITON_BLOCK_SIZES}; this weight has block_size={weight.block_size}: "
            f"use backend='torch' for it"
        )
    if not x.is_cuda and not _interpreting():
        raise ValueError(
            f"backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for the CPU "
            f"interpreter); got x on {x.device}"
        )
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"the Triton kernels support float16/bfloat16/float32, got {x.dtype}")
    if weight.nnz_blocks * weight.block_size ** 2 >= 2**31:
        raise ValueError(f"weight has {weight.nnz_blocks} blocks: more than 2**31 values "
                         f"do not fit the kernels' int32 offsets")


def block_sparse_linear_triton(x2d: torch.Tensor, weight: BlockSparseWeight,
                               bias: torch.Tensor | None = None, lora_a: torch.Tensor | None = None,
                               lora_b: torch.Tensor | None = None, scaling: float = 1.0,
                               dropout_p: float = 0.0, *, group_size: int | None = None,
                               cluster: bool = True, split_k: int = 0,
                               seed: torch.Tensor | None = None) -> torch.Tensor:
    """Y [M, N] = x2d W^T (+ bias) (+ scaling * drop(x2d) lora_a^T lora_b^T), differentiable.

    Inputs are assumed checked by `blocksparse.ops.check_inputs`. Schedule
    knobs (defaults pick them): `group_size` G (1 = plain BSR; by default 1
    for M <= 64, else from the union densities), `cluster` (permute block
    rows so groups share columns; computed once per weight and G), `split_k`
    (>= 1 forces the number of union splits), `seed` (int64 [1] Philox seed of
    the LoRA dropout; drawn from torch's generator when None).
    """
    check_triton_support(x2d, weight)
    # The kernels read rows of x (any row stride; see `_aligned`) and bias with unit element strides.
    if x2d.stride(-1) != 1:
        x2d = x2d.contiguous()
    if bias is not None:
        bias = bias.contiguous()
    m = x2d.shape[0]
    has_lora = lora_a is not None

    def schedule(transposed: bool) -> Schedule:
        g = group_size
        if g is None:
            g = 1 if m <= DECODE_MAX_M else choose_group_size(weight, transposed)
        return get_schedule(weight, g, transposed, cluster)

    grad_on = torch.is_grad_enabled()
    needs_dx = grad_on and x2d.requires_grad
    luts = schedule(False).tensors
    t_luts = schedule(True).tensors if needs_dx else []
    w_luts = [weight.crow, weight.col, weight.row_perm] if grad_on and weight.values.requires_grad else []
    if not has_lora:
        dropout_p = 0.0
    if dropout_p > 0 and seed is None:
        seed = new_dropout_seed(x2d.device)
    save_shrink = bool(has_lora and grad_on and lora_b.requires_grad)
    y, _, _ = torch.ops.blocksparse.linear(
        x2d, weight.values, luts, t_luts, w_luts, bias, lora_a, lora_b, seed if dropout_p > 0 else None,
        weight.shape[0], float(scaling), float(dropout_p), int(split_k), save_shrink)
    return y

