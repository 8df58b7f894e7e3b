"""Union densities of Llama-shaped synthetic masks (blocksparse.bench.llama_union), on a small shape."""

import torch

from blocksparse.bench.llama_union import measure, synthetic_block_scores


def test_grouped_masks_union_is_the_density_and_free_masks_exceed_it():
    rows = measure(sparsities=(0.5,), groups=(1, 4), shapes=(("small", 256, 512),))
    by = {(r["G"], r["mask"]): r for r in rows}
    assert by[(1, "free")]["union"] == 0.5 and by[(1, "free")]["max_over_mean"] == 1.0
    assert by[(4, "grouped")]["union"] == 0.5 and by[(4, "grouped")]["max_over_mean"] == 1.0
    assert 0.5 < by[(4, "free")]["union"] < 1.0
    # The transposed mask is not grouped by construction: its unions exceed the density.
    assert by[(4, "grouped")]["union_bwd"] > 0.5


def test_synthetic_scores_have_shared_outlier_columns():
    scores = synthetic_block_scores(512, 1024, torch.Generator().manual_seed(0))
    assert scores.shape == (32, 64) and (scores > 0).all()
    column_share = scores.sum(0) / scores.sum()
    # a block column holding a 20x outlier channel (of its 16) scores about twice the median one
    assert column_share.max() > 1.8 * column_share.median()
