"""Interpolation with negative weights (bicubic: crossvit's image resize) as the linear map it is:
the z-rule through its transpose, checked against gradient × input and by hand."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from relprop import LRP
from tests.references import gradient_times_input, lrp0


class Resized(nn.Module):
    """crossvit in small: a branch that resizes the image (bicubic) and one that does not, and a
    hidden bicubic upsampling of ReLU features."""

    def __init__(self, antialias: bool = False) -> None:
        super().__init__()
        self.antialias = antialias
        self.full, self.small = nn.Conv2d(3, 4, 4, stride=4), nn.Conv2d(3, 4, 3, stride=3)
        self.mix, self.head = nn.Conv2d(4, 4, 3, padding=1), nn.Linear(8, 3)

    def forward(self, x):
        small = F.interpolate(x, size=(9, 9), mode="bicubic", align_corners=False, antialias=self.antialias)
        a = torch.relu(self.full(x)).mean((2, 3))
        b = torch.relu(self.small(small))
        b = torch.relu(self.mix(F.interpolate(b, scale_factor=2, mode="bicubic")))
        return self.head(torch.cat([a, b.mean((2, 3))], 1))


@pytest.mark.parametrize("antialias", [False, True])
def test_lrp0_through_bicubic_resizes_is_gradient_times_input(antialias):
    torch.manual_seed(0)
    model = Resized(antialias).eval()
    x = torch.randn(2, 3, 16, 16)
    R, expected = lrp0(model, x), gradient_times_input(model, x)
    torch.testing.assert_close(R, expected, rtol=0, atol=1e-4 * float(expected.abs().max()))


def test_the_defaults_conserve_through_bicubic_resizes():
    torch.manual_seed(0)
    model = Resized().eval()
    for layer in (model.full, model.small, model.mix, model.head):
        nn.init.zeros_(layer.bias)
    R, sums = LRP(model).attribute(torch.randn(2, 3, 16, 16), return_layer_sums=True)
    torch.testing.assert_close(R.flatten(1).sum(1), sums["output"], rtol=1e-4, atol=1e-6)


class Upsampled(nn.Module):
    def forward(self, x):
        return F.interpolate(torch.relu(x), size=(1, 4), mode="bicubic", align_corners=True).flatten(1)


def _cubic_weights(t: float, a: float = -0.75) -> list[float]:
    """Keys' cubic convolution weights of the 4 neighbours of a point at t in [0, 1) (PyTorch's a)."""
    def near(d: float) -> float:
        return ((a + 2) * d - (a + 3)) * d * d + 1

    def far(d: float) -> float:
        return ((a * d - 5 * a) * d + 8 * a) * d - 4 * a

    return [far(t + 1), near(t), near(1 - t), far(2 - t)]


def test_the_z_rule_of_a_bicubic_upsampling_by_hand():
    """x = (1, 2) upsampled to 4 points (align_corners: the second at t = 1/3): y_1 = Σ_i A_1i x_i
    with the neighbours −1 and 2 clamped to 0 and 1, and the outer weights negative. All
    relevance on y_1 (R_1 = y_1) gives R_i = x_i A_1i, by hand."""
    w = _cubic_weights(1 / 3)
    assert w[0] < 0 and w[3] < 0 and abs(sum(w) - 1) < 1e-12
    x = torch.tensor([[[[1.0, 2.0]]]])
    expected = torch.tensor([[[[1.0 * (w[0] + w[1]), 2.0 * (w[2] + w[3])]]]])
    y = Upsampled()(x)
    torch.testing.assert_close(y[0, 1], expected.sum())
    R = LRP(Upsampled()).attribute(x, target=torch.zeros(1, 4).index_fill(1, torch.tensor([1]), float(y[0, 1])))
    torch.testing.assert_close(R, expected)


def test_a_bicubic_resize_does_not_promise_a_non_negative_output():
    """Its negative lobes overshoot below 0 on a ReLU output: the next layer's z+ must weigh
    that negative part, so the resize is not sign-keeping (bilinear is)."""
    class Bump(nn.Module):
        def __init__(self, mode: str) -> None:
            super().__init__()
            self.mode, self.fc = mode, nn.Linear(16, 2)

        def forward(self, x):
            return self.fc(F.interpolate(torch.relu(x), scale_factor=(1, 4), mode=self.mode).flatten(1))

    x = torch.tensor([[[[0.0, 0.0, 1.0, 0.0]]]])
    assert float(F.interpolate(x, scale_factor=(1, 4), mode="bicubic").min()) < 0
    for mode, keeps in (("bicubic", False), ("bilinear", True)):
        lrp = LRP(Bump(mode).eval())
        lrp.attribute(x)
        step = next(s for s in lrp.engine.steps if s.node.target is F.interpolate)
        assert step.nonnegative is keeps
