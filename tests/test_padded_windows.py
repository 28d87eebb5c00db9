"""Windowed attention over a zero-padded token grid (timm's SAM ViT and SAM2 Hiera at small inputs).

The padded tokens are input-independent: their keys and values are the qkv layer's bias alone. Under
CP (attention weights constant) the relevance of the queries is shared among the values, padded ones
included; the z+ rule on the qkv layer, finding no contribution at a padded token, falls back to
its weights and hands that share to the pad's zeros, which the pad then drops (12-18 % of the total
at 64 px). A constant pad is a concatenation with constants, so the composite's constants policy
decides: `KeepOnInput` (the default) keeps that relevance on the input-dependent elements, as it
does for a concatenated class token; `LeakToConstants` drops it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from relprop import LRP


class PaddedWindowAttention(nn.Module):
    """Tokens on a 5x5 grid, padded to windows of 3 (6x6), attention within each window, cropped
    back, a residual add and a linear head: the shape of SAM's windowed blocks."""

    def __init__(self, dim: int = 8, window: int = 3, pad: str = "function") -> None:
        super().__init__()
        self.window, self.dim = window, dim
        self.embed, self.norm = nn.Conv2d(3, dim, 2, stride=2), nn.LayerNorm(dim)
        self.qkv, self.proj, self.head = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim), nn.Linear(dim, 4)
        self.pad = nn.ZeroPad2d((0, 0, 0, 1, 0, 1)) if pad == "module" else None

    def forward(self, x):
        x = self.embed(x).permute(0, 2, 3, 1)  # (B, 5, 5, C)
        B, H, W, C = x.shape
        w = self.window
        h = self.norm(x)
        h = self.pad(h) if self.pad is not None else F.pad(h, (0, 0, 0, 1, 0, 1))  # (B, 6, 6, C)
        h = h.view(B, 2, w, 2, w, C).permute(0, 1, 3, 2, 4, 5).reshape(B * 4, w * w, C)
        q, k, v = self.qkv(h).chunk(3, dim=-1)
        attn = (q @ k.transpose(-2, -1) / C**0.5).softmax(-1)
        h = self.proj(attn @ v).view(B, 2, 2, w, w, C).permute(0, 1, 3, 2, 4, 5).reshape(B, 6, 6, C)
        x = x + h[:, :H, :W]
        return self.head(x.mean((1, 2)))


def _model(pad: str) -> nn.Module:
    torch.manual_seed(0)
    model = PaddedWindowAttention(pad=pad).eval()
    with torch.no_grad():  # qkv biases as a trained model has them: the padded tokens' values
        model.qkv.bias.uniform_(-1.0, 1.0)
    return model


@pytest.mark.parametrize("pad", ["function", "module"])
def test_padded_windows_conserve_with_constants_kept_on_the_input(pad):
    model = _model(pad)
    x = torch.randn(2, 3, 10, 10)
    R, sums = LRP(model).attribute(x, return_layer_sums=True)
    assert torch.isfinite(R).all()
    torch.testing.assert_close(R.flatten(1).sum(1), sums["output"], rtol=1e-4, atol=1e-6)


def test_padded_windows_leak_the_padded_share_with_constants_leak():
    """The other policy, and proof that the model gives the pad relevance at all: the leak is the
    share the attention gives the padded tokens' (bias-only) values."""
    model = _model("function")
    x = torch.randn(2, 3, 10, 10)
    R, sums = LRP(model, constants="leak").attribute(x, return_layer_sums=True)
    lost = sums["output"] - R.flatten(1).sum(1)
    assert bool((lost.abs() > 1e-3 * sums["output"].abs()).all()), lost


def test_a_zero_pad_without_relevance_on_its_zeros_is_a_plain_crop():
    """Under the ε-rule nothing reaches the zeros: the map is the same under both policies, to the bit."""
    model = _model("function")
    x = torch.randn(2, 3, 10, 10)
    rules = {nn.Linear: "epsilon", nn.Conv2d: "epsilon"}
    kept = LRP(model, rules=rules).attribute(x)
    leaked = LRP(model, rules=rules, constants="leak").attribute(x)
    assert torch.equal(kept, leaked)
