"""Roofline model: exact bytes and FLOPs of small cases, regime behaviour, errors; the ideal model's
formulas and what the honest one adds."""

import pytest

from blocksparse.kernels.configs import TILE_EFFICIENCY
from blocksparse.kernels.roofline import (DEVICES, PHILOX_OPS_PER_ELEMENT, compare_table, default_union_density,
                                         layer_times, llama2_7b_table, llama_union, main, predict, tile_table)

H200 = DEVICES["h200"]
LAUNCH = H200.launch_us * 1e-6


def test_dense_decode_is_memory_bound_on_w():
    p = predict("dense", 1, 4096, 4096, device="h200")
    hbm = (4096 * 4096 + 4096 + 4096) * 2
    assert p.hbm_bytes == hbm
    assert p.flops == 2 * 4096 * 4096
    assert p.time_s == pytest.approx(hbm / (4.8e12 * 0.90) + LAUNCH)
    assert p.bound == "memory"


def test_dense_prefill_is_compute_bound():
    p = predict("dense", 2048, 4096, 4096, device="h100", model="ideal")
    assert p.flops == 2 * 2048 * 4096 * 4096
    assert p.time_s == pytest.approx(p.flops / (989.4e12 * 0.80) + LAUNCH)
    assert p.bound == "compute"


def test_sparse_decode_reads_present_blocks_and_metadata():
    p = predict("sparse", 1, 4096, 4096, density=0.5)
    nnz = 0.5 * 256 * 256
    assert p.hbm_bytes == nnz * 256 * 2 + 4096 * 2 + 4096 * 2 + nnz * 4 + 257 * 4
    assert p.flops == 2 * 16 * 4096 * 4096 * 0.5        # tokens padded to 16 rows
    assert p.group_size is None and p.union_density == 0.5
    # Ideal decode speedup is below 1/density: metadata and the launch gap do not shrink.
    assert 1.5 < p.speedup_over(predict("dense", 1, 4096, 4096)) < 2.0


def test_grouped_prefill_computes_the_union():
    p = predict("sparse", 2048, 4096, 4096, density=0.5, union_density=0.7, group_size=8)
    assert p.flops == pytest.approx(2 * 2048 * 4096 * 4096 * 0.7)
    assert p.useful_flops == pytest.approx(2 * 2048 * 4096 * 4096 * 0.5)
    # X is re-read from L2 once per group (BN = 128) over the union's columns.
    narrow = predict("sparse", 2048, 4096, 4096, density=0.5, union_density=0.5, group_size=1)
    assert narrow.l2_bytes > 4 * p.l2_bytes / 2
    assert narrow.bound == "l2" and narrow.time_s > predict("dense", 2048, 4096, 4096).time_s


def test_group_size_none_picks_the_fastest_measured_g():
    best = predict("sparse", 2048, 11008, 4096, density=0.5, model="ideal")
    times = [predict("sparse", 2048, 11008, 4096, density=0.5, group_size=g, model="ideal").time_s
             for g in (1, 2, 4, 8)]
    assert best.time_s == min(times)
    assert best.union_density == pytest.approx(default_union_density(0.5, best.group_size))


def test_default_union_density_interpolates():
    assert default_union_density(1.0, 4) == 1.0
    assert default_union_density(0.5, 1) == 0.5
    u25, u375, u50 = (default_union_density(d, 4) for d in (0.25, 0.375, 0.5))
    assert u375 == pytest.approx((u25 + u50) / 2)
    assert 0.25 < u25 < u50 < 1.0


def test_fused_lora_beats_unfused_and_costs_extra_kernels():
    kw = dict(density=0.5, lora_rank=8, group_size=8)
    dense_lora = predict("dense_lora", 2048, 4096, 4096, lora_rank=8)
    fused = predict("sparse_lora", 2048, 4096, 4096, **kw)
    plain = predict("sparse", 2048, 4096, 4096, density=0.5, group_size=8)
    assert [k.name for k in dense_lora.kernels] == ["Y = X W^T", "T = X A^T", "Y += T B^T"]
    assert len(fused.kernels) == 2
    assert plain.time_s < fused.time_s < dense_lora.time_s
    # rank 8 is padded to 16 in the epilogue MMA
    assert fused.flops - plain.flops == pytest.approx(2 * 2048 * 4096 * 8 + 2 * 2048 * 4096 * 16)


def test_backward_adds_dx_and_lora_gradients():
    fwd = predict("dense_lora", 2048, 4096, 4096, lora_rank=8)
    both = predict("dense_lora", 2048, 4096, 4096, lora_rank=8, backward=True)
    assert len(both.kernels) == len(fwd.kernels) + 5
    assert both.useful_flops == pytest.approx(2 * (2 * 2048 * 4096 * 4096) + 6 * 2048 * 8 * (4096 + 4096))
    sparse = predict("sparse_lora", 2048, 4096, 4096, density=0.5, lora_rank=8, group_size=4, backward=True,
                     union_density=0.65, union_density_bwd=0.8)
    dx = [k for k in sparse.kernels if k.name.startswith("dX")]
    assert len(dx) == 1 and dx[0].flops == pytest.approx(2 * 2048 * 4096 * 4096 * 0.8 + 2 * 2048 * 4096 * 16)


def test_fp32_moves_twice_the_bytes():
    assert predict("dense", 1, 1024, 1024, dtype="fp32").hbm_bytes == 2 * predict("dense", 1, 1024, 1024).hbm_bytes


@pytest.mark.parametrize("kwargs, message", [
    (dict(provider="cusparse"), "provider must be one of"),
    (dict(device="v100"), "device must be one of"),
    (dict(N=4100), "divide by the block size 16"),
    (dict(density=0.0), "density must lie in"),
    (dict(provider="sparse_lora"), "needs lora_rank"),
    (dict(union_density=0.6), "pass group_size too"),
    (dict(union_density=0.3, group_size=4), "union_density must lie in"),
    (dict(dtype="int8"), "dtype must be one of"),
    (dict(model="optimistic"), "model must be one of"),
    (dict(masks="striped"), "masks must be one of"),
])
def test_bad_arguments(kwargs, message):
    args = dict(provider="sparse", M=2048, N=4096, K=4096, density=0.5)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        predict(args.pop("provider"), args.pop("M"), args.pop("N"), args.pop("K"), **args)


def test_llama_table_and_main(capsys):
    table = llama2_7b_table("h200", sparsities=(0.5,))
    assert table.count("\n| ") == 1 + 3 * 4          # header, 3 shapes x 4 regimes
    assert "gate/up 11008x4096 | prefill M=2048 | 50%" in table
    assert main(["--device", "a100", "--sparsity", "0.75"]) == 0
    out = capsys.readouterr().out
    assert "A100" in out and "Per Llama-2-7B decoder layer" in out


def test_honest_prefill_charges_triton_efficiency_narrow_tiles_and_waves():
    # 4096 x 4096 at G=2 (n32 MMA): 16 M tiles x 128 groups = 2048 programs on 264 CTA slots.
    p = predict("sparse", 2048, 4096, 4096, density=0.5, union_density=0.5, group_size=2)
    main_kernel, = p.kernels
    assert (main_kernel.triton, main_kernel.mma_n) == (True, 32)
    waves = -(-2048 // 264) * 264 / 2048
    assert main_kernel.waves == pytest.approx(waves)
    compute = main_kernel.flops / (989.4e12 * 0.62 * TILE_EFFICIENCY[32]) * waves
    assert main_kernel.times(H200, "bf16")["compute"] == pytest.approx(compute)
    assert main_kernel.times(H200, "bf16")["l2"] == pytest.approx(main_kernel.l2_bytes / (5.5e12 * 132 / 114))
    assert p.time_s > predict("sparse", 2048, 4096, 4096, density=0.5, union_density=0.5, group_size=2,
                              model="ideal").time_s


def test_cublas_keeps_its_measured_efficiency():
    p = predict("dense", 2048, 4096, 4096)
    gemm, = p.kernels
    assert "l2" not in gemm.times(H200, "bf16")
    waves = 2 * 132 / 256                      # 16 x 16 tiles of 128 x 256 on 132 SMs
    assert p.time_s == pytest.approx(p.flops / (989.4e12 * 0.80) * waves + LAUNCH)


def test_dx_walks_the_transposed_union():
    p = predict("sparse", 2048, 4096, 4096, density=0.5, group_size=8, masks="grouped", backward=True)
    dx = next(k for k in p.kernels if k.name.startswith("dX"))
    assert dx.flops == pytest.approx(2 * 2048 * 4096 * 4096 * llama_union("grouped", 0.5, 8, backward=True))
    assert dx.waves == pytest.approx(2 * 264 / (16 * 32))     # 512 programs on 264 CTA slots


def test_grouped_masks_make_the_forward_union_the_density():
    for g in (2, 4, 8):
        assert llama_union("grouped", 0.5, g) == 0.5
        assert llama_union("free", 0.5, g) > 0.5
        assert llama_union("grouped", 0.5, g, backward=True) > 0.5
    u25, u375, u50 = (llama_union("free", d, 4) for d in (0.25, 0.375, 0.5))
    assert u375 == pytest.approx((u25 + u50) / 2)


def test_dropout_costs_one_philox_pass_and_the_fused_path_reads_its_stored_bits():
    m, n, k, r = 2048, 4096, 4096, 8
    kw = dict(lora_rank=r, dropout=True, backward=True)
    fused = predict("sparse_lora", m, n, k, density=0.5, group_size=8, **kw)
    unfused = predict("dense_lora", m, n, k, **kw)
    per_pass = m * k * PHILOX_OPS_PER_ELEMENT
    assert [c.name for c in fused.kernels if c.alu_ops] == ["T = drop(X) A^T"]
    assert sum(c.alu_ops for c in fused.kernels) == per_pass
    assert sum(c.alu_ops for c in unfused.kernels) == per_pass
    assert {c.name for c in unfused.kernels} >= {"drop(X)", "dropout backward"}
    plain = predict("sparse_lora", m, n, k, density=0.5, group_size=8, lora_rank=r, backward=True)
    # The keep bits: written by the shrink, read by dX's LoRA term and by dA.
    assert fused.hbm_bytes - plain.hbm_bytes == pytest.approx(3 * m * k / 8)
    assert fused.time_s > plain.time_s
    # the ideal model charged no Philox at all
    ideal = predict("sparse_lora", m, n, k, density=0.5, group_size=8, model="ideal", **kw)
    assert all("alu" not in c.times(H200, "bf16", "ideal") for c in ideal.kernels)
    assert any("alu" in c.times(H200, "bf16") for c in fused.kernels)


def test_compare_table_puts_both_models_side_by_side():
    table = compare_table("h200", sparsities=(0.5,))
    assert "ideal model" in table and "honest, grouped masks" in table
    assert table.count("| fine-tune step M=2048, dropout 0.05 | 50% |") == 1
    assert main(["--device", "h100", "--compare"]) == 0


def test_tile_table_larger_tiles_at_one_cta_per_sm_and_the_compute_ceiling():
    # One CTA per SM halves the slots the waves fill; a 256-token tile halves W's L2 re-reads.
    p = predict("sparse", 2048, 4096, 4096, density=0.5, union_density=0.5, group_size=8, block_m=256, cta_slots=1)
    main_kernel, = p.kernels
    assert main_kernel.waves == pytest.approx(-(-256 // 132) * 132 / 256)  # 8 M tiles x 32 groups on 132 slots
    launched = predict("sparse", 2048, 4096, 4096, density=0.5, union_density=0.5, group_size=8).kernels[0]
    assert main_kernel.l2_bytes < launched.l2_bytes
    table = tile_table("h200", sparsities=(0.5,))
    rows = [line for line in table.splitlines() if line.startswith("| 1") or line.startswith("| 2")]
    assert [r.split(" | ")[0] for r in rows] == ["| 128 x 128 (8)", "| 256 x 128 (8)", "| 128 x 256 (16)"]
    # the launched row is what the per-layer summary gives for grouped masks at 50%
    dense, sparse, _ = layer_times("h200", 0.5, 2048, False)
    assert rows[0].endswith(f"| {dense / sparse:.2f}x |")
    ceiling = 0.62 / 0.80 / 0.5
    assert table.splitlines()[-1].endswith(f"| {ceiling:.2f}x |")
    speedups = [float(r.rstrip(" |").rsplit(" ", 1)[1].rstrip("x")) for r in rows]
    assert speedups[0] < min(speedups[1:]) and max(speedups) <= ceiling
    assert main(["--device", "h200", "--tiles"]) == 0
