"""The sequential driver (blocksparse.prune.prune_model) on a tiny random Llama."""

import contextlib

import pytest
import torch

from blocksparse.prune import prune_model
from blocksparse.prune.calibration import sink_probe_ids
from blocksparse.sparsify import target_linears
from helpers import CALIB, make_tiny_llama, prune_tiny, sparse_layers

PROBE = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize("method", ["wanda", "obs", "magnitude", "obc"])
def test_every_block_row_keeps_the_same_number_of_blocks(method):
    model, report = prune_tiny(method=method)
    layers = sparse_layers(model)
    assert len(layers) == 2 * 7  # every q/k/v/o/gate/up/down of both layers
    for name, layer in layers.items():
        per_row = layer.block_mask.sum(1)
        assert per_row.tolist() == [layer.block_mask.shape[1] // 2] * layer.block_mask.shape[0], name
        assert report["layers"][name]["blocks_per_row"] == [layer.block_mask.shape[1] // 2]
        assert report["layers"][name]["zero_output_rows"] == 0
    assert report["total_density"] == 0.5


def test_pruned_weights_are_zero_outside_the_mask_and_model_still_runs():
    model, _ = prune_tiny(method="wanda")
    for layer in sparse_layers(model).values():
        dense = layer.to_dense()
        outside = ~layer.block_mask.repeat_interleave(16, 0).repeat_interleave(16, 1)
        assert torch.count_nonzero(dense[outside]) == 0
    assert torch.isfinite(model(PROBE).logits).all()


def test_global_group_keeps_half_of_each_matrix_with_uneven_rows():
    model, report = prune_tiny(method="wanda", comparison_group="global", reconstruct=False)
    uneven = 0
    for name, layer in sparse_layers(model).items():
        assert layer.block_mask.sum() == layer.block_mask.numel() // 2, name
        uneven += len(report["layers"][name]["blocks_per_row"]) > 1
    assert uneven > 0  # one threshold per matrix does not balance block rows
    assert report["total_density"] == 0.5


@pytest.mark.parametrize("block_size", [8, 32])
def test_other_block_sizes(block_size):
    model, report = prune_tiny(block_size=block_size, sparsity=0.5, method="wanda")
    for layer in sparse_layers(model).values():
        assert layer.block_size == block_size
        assert (layer.block_mask.sum(1) == layer.block_mask.shape[1] // 2).all()
    assert report["total_density"] == 0.5


def test_block_size_that_does_not_divide_a_matrix_is_refused():
    # k_proj/v_proj have 2 KV heads x 16 = 32 outputs: not a multiple of 64.
    with pytest.raises(ValueError, match=r"block size 64; not divisible: .*k_proj"):
        prune_tiny(block_size=64)


def test_sparsity_out_of_range_is_refused():
    with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\), got 1.0"):
        prune_tiny(sparsity=1.0)


def test_convert_false_leaves_masked_dense_linears():
    model, report = prune_tiny(method="wanda", convert=False)
    assert not sparse_layers(model)
    lin = target_linears(model)["model.layers.0.mlp.down_proj"]
    blocks = lin.weight.reshape(4, 16, 8, 16).abs().sum(dim=(1, 3)) > 0
    assert (blocks.sum(1) == 4).all()


def test_sink_weight_is_validated_and_reported():
    with pytest.raises(ValueError, match="sink_weight must be >= 1"):
        prune_tiny(sink_weight=0.5)
    _, report = prune_tiny(method="magnitude", reconstruct=False, sink_weight=1.0)
    assert report["sink_weight"] == 1.0


def test_sink_probes_fit_the_first_position_for_first_tokens_the_windows_lack():
    # Position 0 attends only to itself, so a one-token sequence is the first position of any
    # window starting with that token. With the probes in the fit, the pruned model's output
    # there is closer to the dense one for the probe tokens, most of which start no window.
    reference = make_tiny_llama()
    probes = sink_probe_ids(CALIB, 64, reference.config.bos_token_id)
    unseen = probes[~torch.isin(probes[:, 0], CALIB[:, 0])]
    assert len(unseen) > 50
    errors = {}
    for sink_tokens in (0, 64):
        model, report = prune_tiny(method="wanda", sink_tokens=sink_tokens)
        assert report["sink_tokens"] == sink_tokens
        out, ref = model(unseen).logits, reference(unseen).logits
        errors[sink_tokens] = ((out - ref).norm() / ref.norm()).item()
    assert errors[64] < 0.8 * errors[0], errors
    with pytest.raises(ValueError, match="sink_tokens"):
        prune_tiny(sink_tokens=-1)


def test_dense_target_follows_the_dense_model_through_layers_left_unpruned():
    # Only layer 1 is pruned, so q/k/v (its first linears) see exactly the dense model's
    # inputs: fitting the dense outputs and fitting their own weights must agree.
    only_layer_1 = lambda module, name: name.startswith("model.layers.1.")  # noqa: E731
    weights = {}
    for target in ("dense", "pruned"):
        model, _ = prune_tiny(method="wanda", reconstruct_target=target, filter_fn=only_layer_1)
        weights[target] = {name: m.to_dense() for name, m in sparse_layers(model).items()}
    assert len(weights["dense"]) == 7
    for proj in ("q_proj", "k_proj", "v_proj"):
        name = f"model.layers.1.self_attn.{proj}"
        torch.testing.assert_close(weights["dense"][name], weights["pruned"][name], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("target", ["pruned", "dense"])
def test_reconstruction_lowers_the_model_output_error_on_calibration_data(target):
    reference = make_tiny_llama()(CALIB).logits
    errors = {}
    for reconstruct in (False, True):
        model, _ = prune_tiny(method="wanda", reconstruct=reconstruct, reconstruct_target=target)
        errors[reconstruct] = ((model(CALIB).logits - reference).norm() / reference.norm()).item()
    assert errors[True] < 0.8 * errors[False]


def test_explicit_allocation_keeps_the_total_at_the_target():
    model = make_tiny_llama()
    names = list(target_linears(model))
    allocation = {name: (0.75 if ".layers.0." in name else 0.25) for name in names}
    report = prune_model(model, CALIB, sparsity=0.5, allocation=allocation, batch_size=4, progress=False)
    layers = sparse_layers(model)
    assert report["total_density"] == 0.5
    assert layers["model.layers.0.mlp.up_proj"].block_mask.sum(1).tolist() == [3] * 8
    assert layers["model.layers.1.mlp.up_proj"].block_mask.sum(1).tolist() == [1] * 8


def test_a_module_prefix_keeps_its_density_and_the_rest_share_the_budget():
    model = make_tiny_llama()
    report = prune_model(model, CALIB, sparsity=0.5, allocation={"model.layers.0.mlp": 1.0},
                         batch_size=4, progress=False)
    layers = sparse_layers(model)
    for proj in ("gate_proj", "up_proj", "down_proj"):  # kept whole: they stay nn.Linear, dense BLAS runs them
        assert report["layers"][f"model.layers.0.mlp.{proj}"]["density"] == 1.0, proj
        assert type(getattr(model.model.layers[0].mlp, proj)) is torch.nn.Linear, proj
    assert report["total_density"] == 0.5
    assert layers["model.layers.1.mlp.up_proj"].block_mask.float().mean() < 0.5
    assert report["allocation"] == {"explicit": {"model.layers.0.mlp": 1.0}}


def test_owl_allocation_keeps_the_total_at_the_target():
    model, report = prune_tiny(method="wanda", allocation="owl", owl_spread=0.25)
    assert report["total_density"] == 0.5
    assert len(report["owl_outlier_ratios"]) == 2
    layer_density = [sum(report["layers"][n]["density"] for n in report["layers"] if f".layers.{i}." in n)
                     for i in range(2)]
    assert layer_density[0] != layer_density[1]


@pytest.mark.parametrize("method", ["wanda", "obs", "magnitude", "obc"])
@pytest.mark.parametrize("row_group, union_density", [(2, None), (4, None), (2, 0.75)])
def test_every_method_honours_the_row_groups(method, row_group, union_density):
    model, report = prune_tiny(method=method, row_group=row_group, union_density=union_density)
    assert report["row_group"] == row_group and report["total_density"] == 0.5
    for name, layer in sparse_layers(model).items():
        w = layer.sparse_weight
        mask, cols = w.block_mask, w.block_grid[1]
        keep = cols // 2
        assert mask.sum(1).tolist() == [keep] * mask.shape[0], name     # every row keeps its count
        assert w.row_group == row_group
        union = keep if union_density is None else max(keep, round(union_density * cols))
        stored = mask[w.row_perm.long()]
        for g in range(0, stored.shape[0], row_group):                    # every group within budget
            assert int(stored[g:g + row_group].any(0).sum()) <= union, (name, g)
        entry = report["layers"][name]["union_density"]
        assert entry["group_size"] == row_group and entry["forward"] <= union / cols + 1e-9


def test_grouped_model_computes_what_its_masked_weights_do():
    masked, _ = prune_tiny(method="wanda", row_group=4, convert=False)
    grouped, _ = prune_tiny(method="wanda", row_group=4)
    torch.testing.assert_close(grouped(PROBE).logits, masked(PROBE).logits, rtol=1e-4, atol=1e-5)


def test_row_group_options_are_validated():
    with pytest.raises(ValueError, match="row_group must be an int >= 1"):
        prune_tiny(row_group=0)
    with pytest.raises(ValueError, match=r"union_density must be in \(0, 1\]"):
        prune_tiny(row_group=2, union_density=1.5)
    with pytest.raises(ValueError, match="give row_group > 1 with it"):
        prune_tiny(union_density=0.6)
    with pytest.raises(ValueError, match="use comparison_group='block-row'"):
        prune_tiny(row_group=2, comparison_group="global", reconstruct=False)


LAYERWISE = dict(method="wanda", allocation="owl", owl_spread=0.25, reconstruct_target="dense", refine_steps=2,
                 sink_tokens=4, permute_channels=True)


def test_layer_by_layer_runs_give_the_same_model_and_place_one_decoder_layer_at_a_time(monkeypatch):
    # The execution device here is the CPU the model lives on (nothing moves), so the
    # placements are recorded: every decoder layer runs (OWL's pass, statistics, refinement,
    # the advance) only while it alone of the model's layers is placed, and the modules
    # outside the layers only for the pass to layer 0.
    from blocksparse.prune import calibration, driver

    placed = []
    real = calibration.placed_on

    @contextlib.contextmanager
    def recording(module, device, read_only=False):
        placed.append(module)
        with real(module, device, read_only):
            yield module
        placed.remove(module)

    monkeypatch.setattr(calibration, "placed_on", recording)
    monkeypatch.setattr(driver, "placed_on", recording)
    reference, reference_report = prune_tiny(**LAYERWISE)
    model = make_tiny_llama()
    layers = list(model.model.layers)
    runs = []
    for i, layer in enumerate(layers):
        def check(module, args, i=i):
            if any(model.model.embed_tokens is p for p in placed):
                return  # the pass to layer 0, stopped before layer 0 runs
            resident = [j for j, other in enumerate(layers) if any(other is p for p in placed)]
            runs.append(i)
            assert resident == [i], (i, resident)
        layer.register_forward_pre_hook(check)
    embedding_passes = []
    model.model.embed_tokens.register_forward_pre_hook(
        lambda module, args: embedding_passes.append(any(module is p for p in placed)))
    report = prune_model(model, CALIB, progress=False, batch_size=4, execution_device="cpu", **LAYERWISE)
    assert set(runs) == {0, 1} and embedding_passes and all(embedding_passes)
    assert placed == []
    assert report["layers"] == reference_report["layers"]
    expected = reference.state_dict()
    for name, value in model.state_dict().items():
        assert torch.equal(value, expected[name]), name


def test_owl_statistics_of_the_layer_by_layer_pass_are_those_of_the_whole_model():
    from blocksparse.families import decoder_layers
    from blocksparse.prune.calibration import dense_sq_norms, layer0_inputs

    model = make_tiny_llama()
    layers = decoder_layers(model)
    targets = target_linears(model)
    by_layer = [{n: lin for n, lin in targets.items() if f".layers.{i}." in n} for i in range(len(layers))]
    batches = list(CALIB.split(4))
    expected = {n: torch.zeros(lin.in_features, dtype=torch.float64) for n, lin in targets.items()}

    def accumulate(name):
        def hook(module, args):
            expected[name] += args[0].reshape(-1, args[0].shape[-1]).double().square().sum(0)
        return hook

    handles = [lin.register_forward_pre_hook(accumulate(n)) for n, lin in targets.items()]
    with torch.no_grad():
        for ids in batches:
            model(input_ids=ids, use_cache=False)
    for handle in handles:
        handle.remove()
    hidden, kwargs = layer0_inputs(model, layers, batches, torch.device("cpu"))
    got = dense_sq_norms(layers, hidden, kwargs, by_layer, torch.device("cpu"))
    assert got.keys() == expected.keys()
    for name in got:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-6, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (the execution device)")
def test_a_model_on_the_cpu_prunes_on_the_gpu_one_layer_at_a_time():
    on_gpu = make_tiny_llama(num_layers=4).cuda()
    prune_model(on_gpu, CALIB, progress=False, batch_size=4, **LAYERWISE)
    model = make_tiny_llama(num_layers=4)
    layers = list(model.model.layers)
    on_device = []
    for layer in layers:  # which decoder layers have parameters on the GPU whenever one runs
        layer.register_forward_pre_hook(lambda module, args: on_device.append(
            sum(next(other.parameters()).is_cuda for other in layers)))
    prune_model(model, CALIB, progress=False, batch_size=4, execution_device="cuda", **LAYERWISE)
    assert on_device and max(on_device) == 1
    assert all(p.device.type == "cpu" for p in model.parameters())
    for name, value in model.state_dict().items():
        assert torch.equal(value, on_gpu.state_dict()[name].cpu()), name


# Peak host memory (RssAnon, sampled) of pruning a memory-mapped model with offload_dir.
OFFLOAD_PEAK = """
import sys, threading, time
import torch
from blocksparse.integration.model import load_mapped
from blocksparse.prune import prune_model

def anon():
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("RssAnon:")) * 1024

model, _ = load_mapped(sys.argv[1])
base, peak, done = anon(), [0], threading.Event()

def sample():
    while not done.is_set():
        peak[0] = max(peak[0], anon())
        time.sleep(0.002)

thread = threading.Thread(target=sample)
thread.start()
prune_model(model, torch.randint(0, 256, (2, 32)), sparsity=0.5, method="magnitude", reconstruct=False,
            sink_tokens=0, progress=False, offload_dir=sys.argv[2], permute_channels=True)
done.set()
thread.join()
print(peak[0] - base)
"""


def test_offload_dir_keeps_about_one_layer_in_host_memory(tmp_path):
    """A memory-mapped 730 MB dense model (12 layers of 51 MB, embeddings and head of 64 MB each)
    pruned with offload_dir and permuted channels: host memory grows by about a layer, not by the
    model (each pruned layer, and the permuted embeddings and head, written out and mapped back)."""
    import subprocess
    import sys

    from transformers import LlamaConfig, LlamaForCausalLM

    if not open("/proc/self/status").read().count("RssAnon"):
        pytest.skip("needs Linux's /proc/self/status")
    config = LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=12, num_attention_heads=8,
                         num_key_value_heads=8, vocab_size=16384)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "dense")
    layer_bytes = (4 * 1024 * 1024 + 3 * 1024 * 2816) * 4
    done = subprocess.run([sys.executable, "-c", OFFLOAD_PEAK, str(tmp_path / "dense"), str(tmp_path / "offload")],
                          check=True, capture_output=True, text=True)
    grew = int(done.stdout.split()[-1])
    assert grew < 3 * layer_bytes, f"host memory grew {grew / 2**20:.0f} MiB; a layer is {layer_bytes / 2**20:.0f} MiB"
    assert sorted(p.name for p in (tmp_path / "offload").iterdir()) == sorted(
        [f"layer-{i}.safetensors" for i in range(12)] + ["outside.safetensors"])
