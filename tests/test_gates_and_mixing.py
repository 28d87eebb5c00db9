"""Gated products whose gate the graph cannot tell, and softmaxes mixed before they are read as
attention weights (issue 23): ConViT's `(1 - σ(g))·softmax(QKᵀ) + σ(g)·softmax(pos)` renormalized,
EfficientViM's `softmax(dt + A) * B`. Under CP they are held constant: LRP-0 equals gradient ×
input with them detached.

- A product of two unrelated input-dependent factors with no graph-readable gate (gMLP's
  `u * proj(v)`, FocalNet's `q * h(ctx)`, CoaT's `q * conv(v)`, SwiftFormer's `G * k`) takes the
  uniform rule under CP too (Achtibat et al. 2024, Prop. 3.3). Independent reference: on a
  bias-free product of two linear maps the logit is homogeneous of degree 2, so (Euler) LRP-0
  with each factor keeping half of every term is half of gradient × input.
- The refusal stays available: `ConservativeAttention(ambiguous="refuse")`.
- A half read directly from a split sigmoid is a gate (iFormer's `v, gate = sigmoid(·).chunk(2)`).
- Real timm models at 64 px, random weights (layer scales redrawn, BatchNorm calibrated):
  explained, the fidelity check passing, the input total within 5 % of the probability.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from relprop import LRP
from relprop.core.interpreter import RelevanceEngine
from relprop.core.ops.attention import ConservativeAttention
from relprop.errors import ConfigError, UnsupportedLayerError

from references import gradient_times_input, lrp0, redraw_layer_scales


class SpatialGating(nn.Module):
    """gMLP's spatial gating unit without biases or GELU: `u, v = chunk(W x)`, `u * P v`."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 8, bias=False)
        self.proj = nn.Linear(4, 4, bias=False)
        self.head = nn.Linear(4, 3, bias=False)

    def forward(self, x):
        u, v = self.fc(x).chunk(2, dim=-1)
        return self.head(u * self.proj(v))


def _ambiguous(engine: RelevanceEngine) -> int:
    return sum(1 for step in engine.steps if step.op.name == "scale" and step.info.unrelated and step.info.gate is None)


def test_a_gate_the_graph_cannot_tell_takes_the_uniform_rule_under_cp():
    """Before: refused ('cannot tell the gate from the signal'). Now half of gradient × input."""
    torch.manual_seed(0)
    model = SpatialGating().eval()
    x = torch.randn(3, 6)
    R = lrp0(model, x)
    expected = 0.5 * gradient_times_input(model, x)
    torch.testing.assert_close(R, expected, rtol=0, atol=1e-3 * float(expected.abs().max()))


def test_the_refusal_is_kept_for_who_asks_for_it():
    with pytest.raises(UnsupportedLayerError, match="cannot tell the gate from the signal"):
        LRP(SpatialGating().eval(), attention=ConservativeAttention(ambiguous="refuse")).attribute(torch.randn(2, 6))


def test_an_unknown_choice_for_the_ambiguous_product_is_a_config_error():
    with pytest.raises(ConfigError, match="ambiguous='refuze'.*'uniform' or 'refuse'"):
        ConservativeAttention(ambiguous="refuze")


class SplitSigmoidGate(nn.Module):
    """iFormer: `v, gate = sigmoid(W x).chunk(2)`, then `mix(v) * gate`."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.mix, self.head = nn.Linear(6, 8), nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x):
        v, gate = torch.sigmoid(self.fc(x)).chunk(2, dim=-1)
        return self.head(F.relu(self.mix(v)) * gate)


def test_a_half_of_a_split_sigmoid_is_the_gate():
    """Before: neither factor was read as the gate (the chunk hid the sigmoid)."""
    torch.manual_seed(0)
    model = SplitSigmoidGate().eval()
    steps = [step for step in RelevanceEngine(model).steps if step.op.name == "scale" and step.info.unrelated]
    assert [step.info.gate for step in steps] == [1]
    R, sums = LRP(model).attribute(torch.randn(2, 6), return_layer_sums=True)
    torch.testing.assert_close(R.sum(1), sums["output"], rtol=1e-4, atol=1e-6)


class MixedAttention(nn.Module):
    """ConViT's gated positional self-attention without biases: two softmaxes mixed by an
    input-independent gate, renormalized by their own sum, then `attn @ v`. `frozen`: the mixed
    weights detached (the reference)."""

    frozen = False

    def __init__(self, dim: int = 6, tokens: int = 5) -> None:
        super().__init__()
        self.qk, self.v = nn.Linear(dim, 2 * dim, bias=False), nn.Linear(dim, dim, bias=False)
        self.pos = nn.Parameter(torch.randn(tokens, tokens))
        self.gating = nn.Parameter(torch.tensor(0.3))
        self.head = nn.Linear(tokens * dim, 3, bias=False)

    def forward(self, x):
        q, k = self.qk(x).chunk(2, dim=-1)
        patch = (q @ k.transpose(-2, -1)).softmax(dim=-1)
        gate = torch.sigmoid(self.gating)
        attn = (1.0 - gate) * patch + gate * self.pos.softmax(dim=-1)
        attn = attn / attn.sum(dim=-1, keepdim=True)
        if self.frozen:
            attn = attn.detach()
        return self.head((attn @ self.v(x)).flatten(1))


def test_a_softmax_mixed_by_a_constant_gate_is_attention_held_constant_under_cp():
    """Before: refused ('the softmax ... is read by function operator.mul, not as attention
    weights'). Now CP holds the mixed weights constant: LRP-0 = gradient × input with them detached."""
    torch.manual_seed(0)
    model = MixedAttention().eval()
    x = torch.randn(2, 5, 6)
    R = lrp0(model, x)
    model.frozen = True
    expected = gradient_times_input(model, x)
    torch.testing.assert_close(R, expected, rtol=0, atol=1e-3 * float(expected.abs().max()))


class NormalizerReadElsewhere(MixedAttention):
    """The renormalizer `attn.sum(-1)` also feeds the output: not only a held normalizer."""

    def forward(self, x):
        attn = (self.qk(x).chunk(2, dim=-1)[0] @ self.v(x).transpose(-2, -1)).softmax(dim=-1)
        total = attn.sum(dim=-1, keepdim=True)
        return self.head(((attn / total) @ self.v(x) + total).flatten(1))


def test_a_normalizer_read_elsewhere_is_refused():
    with pytest.raises(UnsupportedLayerError, match="the softmax in .* is read by"):
        LRP(NormalizerReadElsewhere().eval())


class StateMixer(nn.Module):
    """EfficientViM's HSM-SSD core without biases: `a = softmax(dt + A)`, `h = x @ (a * b)ᵀ`."""

    frozen = False

    def __init__(self, dim: int = 6, state: int = 4) -> None:
        super().__init__()
        self.bdt = nn.Linear(dim, 2 * state, bias=False)
        self.A = nn.Parameter(torch.randn(state, 1))
        self.head = nn.Linear(dim * state, 3, bias=False)

    def forward(self, x):  # x: (batch, dim, tokens)
        b, dt = self.bdt(x.transpose(-2, -1)).transpose(-2, -1).chunk(2, dim=1)
        a = (dt + self.A).softmax(-1)
        if self.frozen:
            a = a.detach()
        return self.head((x @ (a * b).transpose(-2, -1)).flatten(1))


def test_a_softmax_gating_values_elementwise_is_held_constant_under_cp():
    """Before: refused (the softmax read by operator.mul). Now the softmax is the product's gate:
    with it detached the logit is bilinear in x and b, and the uniform rule at `x @ (a·b)ᵀ` gives
    half of gradient × input (Euler)."""
    torch.manual_seed(0)
    model = StateMixer().eval()
    x = torch.randn(2, 6, 5)
    R = lrp0(model, x)
    model.frozen = True
    expected = 0.5 * gradient_times_input(model, x)
    torch.testing.assert_close(R, expected, rtol=0, atol=1e-3 * float(expected.abs().max()))


# ------------------------------------------------------------------------------------ real models


def _realistic(model: nn.Module, size: int) -> nn.Module:
    """Layer scales redrawn in [0.1, 1] and BatchNorm statistics calibrated on random data."""
    redraw_layer_scales(model).train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(4, 3, size, size))
    return model.eval()


# name: (create_model keywords, what the plan must show: "uniform" or "gate"); ~1-2 s each
MODELS = {
    "coat_tiny": ({"img_size": 64}, "uniform"),
    "convit_tiny": ({"img_size": 64}, "mixing"),
    "efficientvim_m1": ({}, "mixing"),
    "focalnet_tiny_srf": ({}, "uniform"),
    "gmlp_ti16_224": ({"img_size": 64}, "uniform"),
    "iformer_t": ({}, "gate"),
    "swiftformer_xs": ({}, "uniform"),
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_gated_families_are_explained(name):
    timm = pytest.importorskip("timm")
    kwargs, what = MODELS[name]
    torch.manual_seed(0)
    model = _realistic(timm.create_model(name, pretrained=False, num_classes=5, **kwargs), 64)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        probability = model(x).softmax(-1).max(-1).values
    lrp = LRP(model)  # verify="first": the fidelity check runs on this call
    R, sums = lrp.attribute(x, return_layer_sums=True)
    if what == "uniform":
        assert _ambiguous(lrp.engine) > 0
    elif what == "mixing":
        assert any(step.op.name == "softmax" for step in lrp.engine.steps)
    else:
        assert _ambiguous(lrp.engine) == 0
        assert any(step.op.name == "scale" and step.info.unrelated and step.info.gate is not None
                   for step in lrp.engine.steps)
    assert torch.isfinite(R).all()
    torch.testing.assert_close(R.flatten(1).sum(1), probability, rtol=0.05, atol=0)
    torch.testing.assert_close(sums["output"], probability)
