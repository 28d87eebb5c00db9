"""Residual CNNs people fine-tune in 2026, with relprop's defaults: every reported cut carries the
probability the model itself gives (the fidelity check runs on the first call). Transformers
(ViT, DeiT, Swin: attention) are in tests/test_transformers.py."""

from __future__ import annotations

import pytest
import torch
import torchvision

from relprop import LRP

timm = pytest.importorskip("timm")


def build(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if name.startswith("timm:"):
        return timm.create_model(name[5:], pretrained=False, num_classes=10).eval()
    return torchvision.models.get_model(name, weights=None, num_classes=10).eval()


@pytest.mark.parametrize("name", ["convnext_tiny", "efficientnet_b0", "mobilenet_v3_small", "regnet_y_400mf",
                                  "shufflenet_v2_x0_5", "timm:convnext_atto"])
def test_modern_cnn_conserves_with_the_defaults(name):
    model = build(name)
    x = torch.randn(1, 3, 64, 64)
    R, sums = LRP(model).attribute(x, return_layer_sums=True)
    with torch.no_grad():
        probability = torch.softmax(model(x), 1).max(1).values
    assert torch.isfinite(R).all()
    for cut, total in sums.items():
        torch.testing.assert_close(total, probability, rtol=1e-4, atol=1e-6, msg=lambda m, c=cut: f"{c}: {m}")


def test_channel_shuffle_and_chunk_send_relevance_to_the_right_half():
    """ShuffleNet's `x.chunk(2, dim=1)`: relevance of each half returns to its own channels."""
    class Halves(torch.nn.Module):
        def forward(self, x):
            left, right = x.chunk(2, dim=1)
            return torch.cat([left.sum((1, 2, 3))[:, None], 2 * right.sum((1, 2, 3))[:, None]], 1)

    x = torch.rand(1, 4, 3, 3) + 0.1
    R = LRP(Halves()).attribute(x, target=1)
    assert float(R[:, :2].abs().sum()) == 0.0 and float(R[:, 2:].sum()) > 0


def _shifted_batchnorm() -> torch.nn.Module:
    bn = torch.nn.BatchNorm2d(4)
    bn.running_mean.fill_(0.5)  # as after training: non-negative inputs partly below the mean
    return bn


@pytest.mark.parametrize("make_norm", [lambda: torch.nn.GroupNorm(2, 4), _shifted_batchnorm])
def test_a_normalization_after_relu_is_not_taken_for_non_negative(make_norm):
    """ReLU → norm → conv: the norm's output has negative entries, so z+ at the conv must count
    them (a⁻w⁻). Checked against the rule applied directly to the conv's real input."""
    from relprop.core.rules import ZPlusRule

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(), make_norm(),
                                torch.nn.Conv2d(4, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                                torch.nn.Flatten(), torch.nn.Linear(4, 3)).eval()
    x = torch.randn(1, 3, 8, 8)
    _, layers = LRP(model).attribute(x, layers=["2", "3"])
    with torch.no_grad():
        a = model[:3](x)
    assert bool((a < 0).any())
    torch.testing.assert_close(layers["2"], ZPlusRule().relevance(model[3], a, layers["3"]), rtol=1e-4, atol=1e-6)
