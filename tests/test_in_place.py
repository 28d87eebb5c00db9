"""In-place tensor ops whose result is not read: the tensor itself changes (timm's NaFlexEmbeds adds
its position embedding by `x.add_(pos)` and goes on with `x`)."""

import pytest
import torch
from torch import nn

from relprop import LRP
from tests.references import gradient_times_input, lrp0


class AddsInPlace(nn.Module):
    """A patch projection, a position embedding added in place (result unused), then a ReLU
    applied in place the same way; `shape_python` reads a shape in Python (the capture path)."""

    def __init__(self, shape_python: bool) -> None:
        super().__init__()
        self.shape_python = shape_python
        self.proj, self.head = nn.Linear(12, 8), nn.Linear(8, 3)
        self.pos = nn.Parameter(torch.randn(4, 8))

    def forward(self, x):
        tokens = x.reshape(x.shape[0], 4, 12)
        if self.shape_python and tokens.shape[1] % 2:
            tokens = tokens[:, :-1]
        h = self.proj(tokens)
        h.add_(self.pos)
        h.relu_()
        return self.head(h.mean(1))


@pytest.mark.parametrize("shape_python", [False, True])
def test_an_unread_in_place_add_reaches_the_tensors_later_readers(shape_python):
    """Before, the add became out of place and unread: `head` saw the projection without the
    position embedding and the fidelity check refused the model (`proj` differs)."""
    torch.manual_seed(0)
    model = AddsInPlace(shape_python).eval()
    x = torch.randn(2, 48)
    # the position embedding is a bias: LRP-0 lets it take its share (constants="leak")
    R, expected = lrp0(model, x, constants="leak"), gradient_times_input(model, x)
    torch.testing.assert_close(R, expected, rtol=0, atol=1e-5 * float(expected.abs().max()))
    explainer = LRP(model)
    R, sums = explainer.attribute(x, return_layer_sums=True)
    assert explainer.capture_path == ("concrete" if shape_python else "fx")
    assert torch.isfinite(R).all()
