"""FSDP2 (`torch.distributed.fsdp.fully_shard`) over a block-sparse model with LoRA, on the CPU:
two gloo ranks in subprocesses (the worker is `helpers.fsdp_lora_worker`)."""

import json

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from helpers import fsdp_lora_worker


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo")
def test_fsdp_shards_the_block_values_and_trains_lora_leaving_them_bit_identical(tmp_path):
    out = tmp_path / "rank0.json"
    mp.spawn(fsdp_lora_worker, args=(2, str(tmp_path / "init"), str(out)), nprocs=2, join=True)
    result = json.loads(out.read_text())
    assert result["values_count"] == 14 and result["sharded"]       # 2 layers x 7 linears, each split over ranks
    assert 0.45 < result["local_fraction"] <= 0.55                   # rank 0 holds about half of the values
    # The first step's loss (LoRA B = 0) is the unsharded model's: the gathered blocks are the blocks.
    assert result["losses"][0] == pytest.approx(result["unsharded_loss"], rel=1e-5)
    assert result["losses"][-1] < result["losses"][0]
    assert result["lora_b_count"] == 4 and result["lora_b_trained"]
    # Structure (crow, col, row_perm, row_group) and values unchanged, bit for bit.
    assert result["unchanged"]


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo")
def test_each_rank_reads_only_its_shards_of_a_sparse_checkpoint(tmp_path):
    # A model larger than a host's memory per rank: every rank builds the skeleton (structure
    # only), shards it, then reads its own shards; the gathered model is the checkpoint's.
    from blocksparse.integration.checkpoint import save_sparse_pretrained
    from helpers import fsdp_skeleton_worker, prune_tiny

    model, report = prune_tiny(0.5, row_group=2)
    checkpoint = save_sparse_pretrained(model, None, tmp_path / "ckpt", report=report)
    out = tmp_path / "rank0.json"
    mp.spawn(fsdp_skeleton_worker, args=(2, str(tmp_path / "init"), str(checkpoint), str(out)), nprocs=2, join=True)
    result = json.loads(out.read_text())
    assert 0.45 < result["local_fraction"] <= 0.55
    assert result["same_keys"] and result["differ"] == [] and result["same_logits"]


def test_sharded_loading_refuses_weight_files_the_checkpoint_does_not_name(tmp_path):
    # DCP's reader would take every *.safetensors file in the directory, a stale one included.
    import shutil

    from blocksparse.integration.checkpoint import SparseCheckpointError, save_sparse_pretrained, sparse_skeleton
    from blocksparse.integration.fsdp import load_weights
    from helpers import prune_tiny

    checkpoint = save_sparse_pretrained(prune_tiny(0.5)[0], None, tmp_path / "ckpt")
    shutil.copy(checkpoint / "model.safetensors", checkpoint / "model-old.safetensors")
    with pytest.raises(SparseCheckpointError, match="model-old.safetensors is not one of the model's weight files"):
        load_weights(sparse_skeleton(checkpoint)[0], str(checkpoint))
