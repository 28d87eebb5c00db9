"""Residual networks beyond 2-D images: 1-D signals (ECG-like), 3-D volumes and video
(torchvision's video ResNets), transposed convolutions (U-Net decoders), and the relevance of
intermediate layers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from relprop import LRP


class Block1d(nn.Module):
    """A 1-D basic block, as in the ResNets used on ECG (conv-BN-ReLU-conv-BN + skip)."""

    def __init__(self, channels: int, stride: int = 1) -> None:
        super().__init__()
        out = channels * stride
        self.conv1 = nn.Conv1d(channels, out, 7, stride, 3, bias=False)
        self.bn1 = nn.BatchNorm1d(out)
        self.conv2 = nn.Conv1d(out, out, 7, 1, 3, bias=False)
        self.bn2 = nn.BatchNorm1d(out)
        self.down = None if stride == 1 else nn.Sequential(nn.Conv1d(channels, out, 1, stride, bias=False),
                                                          nn.BatchNorm1d(out))

    def forward(self, x):
        skip = x if self.down is None else self.down(x)
        h = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(h)) + skip)


class ResNet1d(nn.Module):
    def __init__(self, classes: int = 5) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv1d(1, 8, 15, 2, 7, bias=False), nn.BatchNorm1d(8), nn.ReLU(),
                                  nn.MaxPool1d(3, 2, 1))
        self.layer1 = Block1d(8)
        self.layer2 = Block1d(8, stride=2)
        self.pool = nn.AdaptiveAvgPool1d(1)
        self.fc = nn.Linear(16, classes)

    def forward(self, x):
        return self.fc(self.pool(self.layer2(self.layer1(self.stem(x)))).flatten(1))


def _trained_looking(model: nn.Module, seed: int = 0) -> nn.Module:
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.running_mean.copy_(torch.randn(module.running_mean.shape, generator=generator) * 0.1)
            module.running_var.copy_(torch.rand(module.running_var.shape, generator=generator) + 0.5)
            module.weight.data.copy_(torch.rand(module.weight.shape, generator=generator) + 0.5)
    return model.eval()


def assert_conserves(model, x, **kwargs):
    R, sums = LRP(model, **kwargs).attribute(x, return_layer_sums=True)
    with torch.no_grad():
        probability = torch.softmax(model(x), 1).max(1).values
    assert R.shape == x.shape
    for name, total in sums.items():
        torch.testing.assert_close(total, probability, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
    return sums


@pytest.mark.parametrize("split", ["ratio", "symmetric"])
@pytest.mark.parametrize("maxpool", ["avg", "wta"])
def test_1d_resnet_conserves_at_every_block(split, maxpool):
    torch.manual_seed(0)
    sums = assert_conserves(_trained_looking(ResNet1d()), torch.randn(3, 1, 500), split=split, maxpool=maxpool)
    assert list(sums) == ["output", "fc", "pool", "layer2", "layer1", "stem.3", "stem.2", "stem.1", "stem.0", "input"]


@pytest.mark.parametrize("arch", ["r3d_18", "mc3_18", "r2plus1d_18"])
def test_video_resnets_conserve(arch):
    import torchvision

    torch.manual_seed(0)
    model = _trained_looking(torchvision.models.get_model(arch, weights=None, num_classes=4))
    sums = assert_conserves(model, torch.randn(1, 3, 4, 32, 32))
    assert "layer4.1" in sums and "stem.0" in sums


class Decoder(nn.Module):
    """A small U-Net-like encoder/decoder with a transposed conv and a skip concatenation."""

    def __init__(self) -> None:
        super().__init__()
        self.down = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.up = nn.ConvTranspose2d(8, 4, 3, stride=2, padding=1, output_padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.mix = nn.Conv2d(7, 6, 3, padding=1)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        h = torch.relu(self.down(x))
        u = torch.relu(self.bn(self.up(h)))
        m = torch.relu(self.mix(torch.cat([u, x], dim=1)))
        return self.fc(m.mean((2, 3)))


@pytest.mark.parametrize("bn", ["pass", "fold"])
def test_transposed_convolution_decoder_conserves(bn):
    torch.manual_seed(0)
    assert_conserves(_trained_looking(Decoder()), torch.randn(2, 3, 16, 16), bn=bn)


def test_layer_relevance_is_what_the_head_alone_gives_back():
    """The relevance at layer4's output equals LRP of the head (avgpool, fc) run on layer4's
    activation with the same seed: an independent computation of the same quantity."""
    import torchvision

    torch.manual_seed(0)
    model = _trained_looking(torchvision.models.resnet18(num_classes=6))
    x = torch.randn(2, 3, 64, 64)
    R, sums, layers = LRP(model).attribute(x, return_layer_sums=True, layers=["layer3", "layer4", "layer4.1"])
    head = nn.Sequential(model.avgpool, nn.Flatten(), model.fc).eval()
    trunk = nn.Sequential(*list(model.children())[:-2]).eval()
    with torch.no_grad():
        features = trunk(x)
    expected = LRP(head, input_rule="zplus").attribute(features)
    torch.testing.assert_close(layers["layer4"], expected, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(layers["layer4.1"], layers["layer4"])
    assert layers["layer3"].shape == (2, 256, 4, 4)
    torch.testing.assert_close(layers["layer3"].sum((1, 2, 3)), sums["layer3.1"], rtol=1e-5, atol=1e-7)


def test_unknown_layer_name_is_a_clear_error():
    import torchvision

    with pytest.raises(ValueError, match="'layer9'"):
        LRP(torchvision.models.resnet18(num_classes=3)).attribute(torch.randn(1, 3, 32, 32), layers=["layer9"])
