"""Conservation as a property: random small residual networks, every split setting."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from relprop import LRP


class Block(nn.Module):
    """A residual block: identity skip when the shape is kept, 1x1 projection otherwise."""

    def __init__(self, cin: int, cout: int, stride: int, bottleneck: bool) -> None:
        super().__init__()
        mid = max(1, cout // 2) if bottleneck else cout
        self.conv1 = nn.Conv2d(cin, mid, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        out += identity
        return self.relu(out)


class RandomResNet(nn.Module):
    def __init__(self, widths: list[int], strides: list[int], bottleneck: bool, concat: bool,
                 functional_head: bool, classes: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=True)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        blocks, cin = [], widths[0]
        for width, stride in zip(widths, strides, strict=True):
            blocks.append(Block(cin, width, stride, bottleneck))
            cin = width
        self.layers = nn.Sequential(*blocks)
        self.concat = concat
        self.functional_head = functional_head
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin * (2 if concat else 1), classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layers(x)
        if self.concat:  # a second, pooled view of the features, concatenated
            x = torch.cat([x, F.avg_pool2d(x, 1)], dim=1)
        if self.functional_head:
            x = x.mean((2, 3))
        else:
            x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


def randomize_batchnorm(model: nn.Module, generator: torch.Generator) -> None:
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            shape = module.running_mean.shape
            module.running_mean.copy_(torch.randn(shape, generator=generator) * 0.3)
            module.running_var.copy_(torch.rand(shape, generator=generator) + 0.5)
            module.weight.data.copy_(torch.randn(shape, generator=generator))
            module.bias.data.copy_(torch.randn(shape, generator=generator) * 0.3)


networks = st.fixed_dictionaries({
    "widths": st.lists(st.integers(2, 6), min_size=1, max_size=3),
    "bottleneck": st.booleans(),
    "concat": st.booleans(),
    "functional_head": st.booleans(),
    "size": st.integers(5, 17),
    "seed": st.integers(0, 2**16),
    "batch": st.integers(1, 3),
})


@settings(max_examples=25, deadline=None)
@given(spec=networks, strides=st.lists(st.sampled_from([1, 2]), min_size=3, max_size=3),
       split=st.sampled_from(["ratio", "symmetric"]), identity_skips=st.booleans())
def test_every_cut_conserves_the_output_relevance(spec, strides, split, identity_skips):
    generator = torch.Generator().manual_seed(spec["seed"])
    torch.manual_seed(spec["seed"])
    widths = spec["widths"]
    model = RandomResNet(widths, strides[: len(widths)], spec["bottleneck"], spec["concat"],
                         spec["functional_head"], classes=4)
    randomize_batchnorm(model, generator)
    model.eval()
    x = torch.randn(spec["batch"], 3, spec["size"], spec["size"] + 1, generator=generator)
    R, sums = LRP(model, split=split, identity_skips=identity_skips).attribute(x, return_layer_sums=True)
    assert torch.isfinite(R).all()
    output = sums["output"]
    assert list(sums)[-1] == "input" and "layers.0" in sums
    for name, total in sums.items():
        torch.testing.assert_close(total, output, rtol=1e-4, atol=1e-7, msg=name)
    torch.testing.assert_close(R.sum((1, 2, 3)), output, rtol=1e-4, atol=1e-7)


def test_zero_activations_fall_back_without_loss():
    """A dead ReLU layer (all activations 0) leaves z+ with nothing to divide by: the fallback
    must still deliver all relevance to the input."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    with torch.no_grad():
        model[0].bias.fill_(-100.0)  # every activation after the first ReLU is zero
    x = torch.randn(2, 3, 6, 6)
    R, sums = LRP(model).attribute(x, return_layer_sums=True)
    assert torch.isfinite(R).all()
    for name, total in sums.items():
        torch.testing.assert_close(total, sums["output"], rtol=1e-4, atol=0, msg=name)


def test_ratio_split_with_both_operands_zero_is_symmetric():
    from relprop.core.splitting import split_strategy

    R = torch.tensor([1.0, 2.0])
    a, b = torch.tensor([0.0, 3.0]), torch.tensor([0.0, 1.0])
    R_a, R_b = split_strategy("ratio")(R, a, b, skip=None)
    torch.testing.assert_close(R_a, torch.tensor([0.5, 1.5]))
    torch.testing.assert_close(R_b, torch.tensor([0.5, 0.5]))
