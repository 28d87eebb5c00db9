"""Pads (zero, constant, −inf before a max pool), RMSNorm, unfold and max reductions: LRP-0 equals
gradient × input on piecewise-linear models that use them (Ancona et al., 2018; configuration as in
test_lrp0_gradient.py), RMSNorm's identity rule equals gradient × input with the RMS held
constant, and the timm models they blocked are explained with the input total near p."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from relprop import LRP
from relprop.errors import UnsupportedLayerError

from references import gradient_times_input, lrp0


class Routed(nn.Module):
    """A shift by a negative zero pad (NASNet), a constant pad of ones (EfficientViT), a 'same'
    max pool padded with −inf (timm's MaxPool2dSame), nn.Unfold (TNT), Tensor.unfold (HaloNet),
    and max reductions by `.amax` (Hiera), `.max(dim)[0]` (VOLO) and `torch.max(..., dim=).values`."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.shift = nn.Conv2d(3, 6, 3, padding=1), nn.ZeroPad2d((-1, 1, -1, 1))
        self.conv, self.unfold = nn.Conv2d(6, 6, 3), nn.Unfold(2, stride=2)
        self.mix, self.head = nn.Linear(24, 8), nn.Linear(8 + 6, 5)

    def forward(self, x):
        h = torch.relu(self.stem(x))  # 16x16
        h = self.conv(F.pad(self.shift(h), (1, 1, 1, 1), value=1.0))  # 16x16
        h = F.max_pool2d(F.pad(h, (0, 1, 0, 1), value=float("-inf")), 3, 2)  # 8x8
        tokens = self.unfold(h).transpose(1, 2)  # (B, 16, 24)
        tokens = torch.relu(self.mix(tokens)).amax(1)  # (B, 8)
        windows = h.unfold(3, 4, 4).flatten(2)  # (B, 6, 64): H x (2 windows x 4)
        pooled = windows.max(2)[0] + torch.max(windows.flip(2), dim=2, keepdim=True).values.squeeze(2)  # (B, 6)
        return self.head(torch.cat([tokens, pooled], 1))


def _lrp0_and_gradient(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # constants="leak": the pad of ones takes its share, as gradient × input gives it (the default
    # keeps a constant pad's share on the input, as it does a concatenated constant's)
    return lrp0(model, x, maxpool="wta", constants="leak"), gradient_times_input(model, x)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_lrp0_is_gradient_times_input_through_pads_unfolds_and_max_reductions(seed):
    torch.manual_seed(seed)
    model = Routed().eval()
    R, expected = _lrp0_and_gradient(model, torch.randn(3, 3, 16, 16))
    # a constant pad value's share is dropped as a bias's is, in both; float32 rounding aside
    torch.testing.assert_close(R, expected, rtol=0, atol=1e-4 * float(expected.abs().max()))


def test_max_reductions_conserve_under_the_proportional_strategy():
    """maxpool="avg": relevance in proportion to the reduced values; the total is kept at the
    reductions: from the output down to the conv, whose biases are zero."""
    torch.manual_seed(0)
    model = Routed().eval()
    for layer in (model.mix, model.head, model.conv):
        nn.init.zeros_(layer.bias)
    x = torch.randn(2, 3, 16, 16)
    R, sums = LRP(model, maxpool="avg").attribute(x, return_layer_sums=True)
    assert torch.isfinite(R).all()
    for cut in ("head", "conv"):
        torch.testing.assert_close(sums[cut], sums["output"], rtol=2e-4, atol=1e-6)


class RMSNormed(nn.Module):
    def __init__(self, detach: bool = False) -> None:
        super().__init__()
        self.detach = detach
        self.embed, self.norm = nn.Linear(8, 16), nn.RMSNorm(16, eps=1e-6)
        self.mid, self.head = nn.Linear(16, 16), nn.Linear(16, 4)
        self.scale = nn.Parameter(torch.rand(16) + 0.5)

    def forward(self, x):
        h = self.embed(x)
        if self.detach:  # the reference: the RMS a constant, as LXT holds LayerNorm's std
            h = h / torch.sqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6).detach() * self.norm.weight
        else:
            h = self.norm(h)
        h = torch.relu(self.mid(h))
        if self.detach:
            h = h / torch.sqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6).detach() * self.scale
        else:
            h = F.rms_norm(h, (16,), self.scale, 1e-6)
        return self.head(h)


@pytest.mark.parametrize("seed", [0, 1])
def test_rms_norm_is_the_identity_with_the_rms_held_constant(seed):
    torch.manual_seed(seed)
    model = RMSNormed().eval()
    with torch.no_grad():
        model.norm.weight.uniform_(0.5, 1.5)
    reference = RMSNormed(detach=True).eval()
    reference.load_state_dict(model.state_dict())
    x = torch.randn(4, 8)
    R, _ = _lrp0_and_gradient(model, x)
    _, expected = _lrp0_and_gradient(reference, x)
    torch.testing.assert_close(R, expected, rtol=0, atol=1e-4 * float(expected.abs().max()))


class Clamped(nn.Module):
    """Gemma 4's clamped linear layer: `torch.clamp` by buffers, then `.clamp(min=)`, bounds that bind."""

    def __init__(self, reference: bool = False) -> None:
        super().__init__()
        self.reference = reference
        self.embed, self.head = nn.Linear(8, 16), nn.Linear(16, 4)
        self.register_buffer("low", torch.tensor(-0.3))
        self.register_buffer("high", torch.tensor(0.4))

    def forward(self, x):
        h = self.embed(x)
        if self.reference:  # the identity rule: the clamp as h times its gain, held constant
            return self.head(h * (torch.clamp(h, self.low, self.high).clamp(min=-0.2) / h).detach())
        return self.head(torch.clamp(h, self.low, self.high).clamp(min=-0.2))


def test_clamp_is_the_identity_with_its_gain_held_constant():
    torch.manual_seed(0)
    model, reference = Clamped().eval(), Clamped(reference=True).eval()
    reference.load_state_dict(model.state_dict())
    x = torch.randn(4, 8)
    assert (model.embed(x).abs() > 0.4).any()  # the bounds bind: the gradient alone would differ
    R, _ = _lrp0_and_gradient(model, x)
    _, expected = _lrp0_and_gradient(reference, x)
    torch.testing.assert_close(R, expected, rtol=0, atol=1e-4 * float(expected.abs().max()))


def _timm_total_over_p(name: str, size: int, **kwargs) -> torch.Tensor:
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, **kwargs).eval()
    batchnorms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for norm in batchnorms:  # running statistics of random data, as training would leave them
        norm.reset_running_stats()
        norm.momentum = None
        norm.train()
    if batchnorms:
        with torch.no_grad():
            for _ in range(2):
                model(torch.randn(4, 3, size, size))
    model.eval()
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        p = torch.softmax(model(x), 1).max(1).values
    R = LRP(model).attribute(x)  # the fidelity check runs in attribute: it raises if it fails
    return R.flatten(1).sum(1) / p


@pytest.mark.parametrize("name, size, kwargs", [
    ("cpubone_nano", 64, {}),  # nn.ZeroPad2d
    ("tnt_s_legacy_patch16_224", 64, {"img_size": 64}),  # nn.Unfold
    ("hiera_tiny_224", 64, {"img_size": 64}),  # .amax
    ("volo_d1_224", 64, {"img_size": 64}),  # .max(dim)
])
def test_timm_models_with_these_ops_are_explained(name, size, kwargs):
    ratio = _timm_total_over_p(name, size, **kwargs)
    torch.testing.assert_close(ratio, torch.ones_like(ratio), rtol=0, atol=0.05)


@pytest.mark.slow
@pytest.mark.parametrize("name, size, kwargs", [
    ("halonet_h1", 256, {}),  # Tensor.unfold
    ("vit_tiny_r_s16_p8_224", 64, {"img_size": 64}),  # −inf pad of MaxPool2dSame
    ("nasnetalarge", 64, {}),  # nn.ZeroPad2d((-1, 1, -1, 1)), −inf-padded max pools
])
def test_larger_timm_models_with_these_ops_are_explained(name, size, kwargs):
    ratio = _timm_total_over_p(name, size, **kwargs)
    torch.testing.assert_close(ratio, torch.ones_like(ratio), rtol=0, atol=0.05)


class Refused(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind, self.conv, self.head = kind, nn.Conv2d(3, 4, 3), nn.Linear(4, 3)
        self.pad = nn.ConstantPad2d(1, float("inf"))

    def forward(self, x):
        h = self.conv(x)
        if self.kind == "inf pad":
            h = self.pad(h)
        elif self.kind == "nan pad":
            h = F.pad(h, (1, 1), value=float("nan"))
        elif self.kind == "clamp by a tensor":
            h = torch.clamp(h, max=h.mean())
        return self.head(h.amax((2, 3)))


@pytest.mark.parametrize("kind, names", [("inf pad", "module 'pad' (ConstantPad2d) pads with inf"),
                                         ("nan pad", "torch.nn.functional.pad"),
                                         ("clamp by a tensor", "clamps by input-dependent bounds")])
def test_pads_and_clamps_it_cannot_weigh_are_refused_in_one_line(kind, names):
    with pytest.raises(UnsupportedLayerError, match=re.escape(names)) as caught:
        LRP(Refused(kind).eval()).attribute(torch.randn(1, 3, 8, 8))
    assert "\n" not in str(caught.value)


class PaddedStem(nn.Module):
    """The same stem three ways: the conv's own padding, `nn.ZeroPad2d` before it, `F.pad` before it."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.conv = nn.Conv2d(3, 4, 3, padding=1 if how == "conv" else 0)
        self.pad, self.head = nn.ZeroPad2d(1), nn.Linear(4, 3)

    def forward(self, x):
        if self.how == "module":
            x = self.pad(x)
        elif self.how == "function":
            x = F.pad(x, (1, 1, 1, 1))
        return self.head(torch.relu(self.conv(x)).mean((2, 3)))


def test_a_zero_pad_before_the_input_layer_gives_the_padded_zeros_no_share():
    """The input rule (W⁺ by default) on conv∘pad equals it on the conv's own padding; on the
    padded tensor it would give the padding a share that the pad then drops."""
    torch.manual_seed(0)
    reference = PaddedStem("conv").eval()
    x = torch.randn(2, 3, 8, 8)
    expected = LRP(reference).attribute(x)
    for how in ("module", "function"):
        model = PaddedStem(how).eval()
        model.load_state_dict(reference.state_dict())
        torch.testing.assert_close(LRP(model).attribute(x), expected, rtol=1e-5, atol=1e-7)
