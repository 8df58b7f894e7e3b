"""Calibration statistics, sink probes and micro-batch cutting."""

import torch

from blocksparse.prune.calibration import InputStats, placed_on, sink_probe_ids, slice_kwargs
from helpers import make_tiny_llama


def test_sink_weight_counts_the_first_token_of_every_window_that_many_times():
    x = torch.randn(3, 5, 8, generator=torch.Generator().manual_seed(0))
    stats = InputStats(8, gram=True, cross=True, sink_weight=10.0)
    stats.add(x, 2 * x)
    flat, first = x.reshape(-1, 8).double(), x[:, 0].double()
    expected = flat.T @ flat + 9 * first.T @ first
    f32 = dict(rtol=1e-5, atol=1e-5)  # the statistics are accumulated from float32 products
    torch.testing.assert_close(stats.gram, expected, **f32)
    torch.testing.assert_close(stats.cross, 2 * expected, **f32)
    torch.testing.assert_close(stats.sq_norms, expected.diagonal(), **f32)
    assert stats.tokens == 15


def test_sink_probes_are_the_most_frequent_calibration_tokens_and_bos():
    calib = torch.tensor([[5, 7, 7, 9], [7, 9, 3, 7]])
    assert sink_probe_ids(calib, 2).tolist() == [[7], [9]]
    assert sink_probe_ids(calib, 2, bos_token_id=1).tolist() == [[1], [7]]
    assert sink_probe_ids(calib, 9, bos_token_id=7).flatten().tolist() == [7, 9, 3, 5]
    assert sink_probe_ids(calib, 0, bos_token_id=1).shape == (0, 1)


def test_micro_batch_kwargs_cut_only_batch_shaped_tensors_at_the_right_samples():
    mask = torch.arange(4.0).view(4, 1, 1, 1).expand(4, 1, 5, 5).to(torch.bfloat16)
    rotary = (torch.ones(1, 5, 8, dtype=torch.bfloat16), torch.zeros(1, 5, 8, dtype=torch.bfloat16))
    positions = torch.arange(5)
    cut = slice_kwargs({"attention_mask": mask, "position_embeddings": rotary, "cache_position": positions,
                         "use_cache": False}, 4, 2, 4, float32=True)
    assert cut["attention_mask"][:, 0, 0, 0].tolist() == [2.0, 3.0] and cut["attention_mask"].dtype == torch.float32
    assert all(t.shape == (1, 5, 8) and t.dtype == torch.float32 for t in cut["position_embeddings"])
    assert torch.equal(cut["cache_position"], positions) and cut["use_cache"] is False


def test_a_read_only_visit_elsewhere_gives_the_module_its_own_tensors_back():
    # No copy back from the device: a memory-mapped model stays mapped. (The meta device
    # stands for a GPU: nothing can be copied back from it.)
    model = make_tiny_llama()
    layer = model.model.layers[0]
    before = {name: t.data_ptr() for name, t in layer.state_dict(keep_vars=True).items()}
    values = {name: t.clone() for name, t in layer.state_dict().items()}
    with placed_on(layer, torch.device("meta"), read_only=True):
        assert all(t.is_meta for t in layer.state_dict().values())
    after = layer.state_dict(keep_vars=True)
    assert {name: t.data_ptr() for name, t in after.items()} == before
    assert all(torch.equal(after[name], values[name]) for name in values)
