"""The reference preset against the authors' code's own outputs (../shared/golden)."""

from __future__ import annotations

import pytest
import torch

from relprop import LRP, heat_quantize

from sharedfiles import load_torchvision_checkpoint, shared_path

# The reference code's skip modes and the paper's ablation settings they correspond to.
MODES = {
    "flows_skip": ("ratio", True),
    "latest": ("ratio", False),
    "flows_skip_simple": ("symmetric", True),
    "simple": ("symmetric", False),
}


def _max_relative_error(ours: torch.Tensor, golden: torch.Tensor) -> torch.Tensor:
    return ((ours - golden).abs().amax((1, 2)) / golden.abs().amax((1, 2))).max()


@pytest.mark.parametrize("mode", MODES)
def test_reference_preset_matches_golden_resnet18(mode, resnet18_tin10, golden_resnet18):
    split, identity_skips = MODES[mode]
    lrp = LRP(resnet18_tin10, split=split, identity_skips=identity_skips, preset="reference")
    heatmaps = lrp.attribute(golden_resnet18["inputs"]).sum(1)
    assert _max_relative_error(heatmaps, golden_resnet18["heatmaps"][mode]) < 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_reference_preset_matches_golden_resnet50(mode):
    golden = torch.load(shared_path("golden", "official_resnet50_random.pt"), weights_only=True)
    model = load_torchvision_checkpoint(shared_path("golden", "resnet50_random_fp16.pt"))
    split, identity_skips = MODES[mode]
    lrp = LRP(model, split=split, identity_skips=identity_skips, preset="reference")
    heatmaps = lrp.attribute(golden["inputs"]).sum(1)
    assert _max_relative_error(heatmaps, golden["heatmaps"][mode]) < 1e-4


@pytest.mark.parametrize("name", ["official_resnet18_tin10.pt", "official_resnet50_random.pt"])
def test_heat_quantize_reproduces_golden_hq_maps(name):
    golden = torch.load(shared_path("golden", name), weights_only=True)
    for mode in MODES:
        quantized = heat_quantize(golden["heatmaps"][mode], levels=8)
        assert torch.equal(quantized, golden["heatmaps_hq8"][mode]), mode


def test_reference_preset_treats_samples_independently(resnet18_tin10, golden_resnet18):
    """The authors' code mixes samples in a batch; ours must give each image its own map."""
    lrp = LRP(resnet18_tin10, preset="reference")
    inputs = golden_resnet18["inputs"][:4]
    batched = lrp.attribute(inputs)
    one_by_one = torch.cat([lrp.attribute(inputs[i:i + 1]) for i in range(4)])
    torch.testing.assert_close(batched, one_by_one, rtol=1e-5, atol=1e-9)


def test_default_conserves_where_reference_leaks(resnet18_tin10, golden_resnet18):
    inputs, probability = golden_resnet18["inputs"], golden_resnet18["prob"]
    _, sums = LRP(resnet18_tin10).attribute(inputs, return_layer_sums=True)
    for name, total in sums.items():
        torch.testing.assert_close(total, probability, rtol=1e-4, atol=0, msg=name)
    reference_totals = golden_resnet18["heatmaps"]["flows_skip_simple"].sum((1, 2))
    assert (reference_totals / probability).max() < 0.95  # the leak the default fixes
