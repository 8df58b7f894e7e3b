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
