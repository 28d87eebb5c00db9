"""The ops the zoo's newer families need (issue 23): attention-like softmax (talking heads, `V·Aᵀ`,
einsum), cosine attention, gated products, GRN/addcmul, copying routes, Tanh/Sigmoid/powers.

Independent references first: on networks whose only nonlinearities are the ones under test, LRP-0
(z-rule, signed split, ε = 0) equals gradient × input of the same network with the parts the rule
holds constant detached (Ancona et al., ICLR 2018, extended by the rule's own definition):
attention weights and gates for CP / signal-take-all, GRN's response N(x). The uniform rule on a
bias-free product of two linear maps is half of gradient × input (each factor keeps half of every
term; Euler: the logit is homogeneous of degree 2). Then real timm and torchvision models at small
inputs, random weights: explained, the fidelity check passing, the input total within 5 % of the
probability (they were refused before these ops)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from relprop import LRP
from relprop.core.interpreter import RelevanceEngine
from relprop.core.ops.attention import ConservativeAttention
from relprop.errors import UnsupportedLayerError

from references import Z_RULE, gradient_times_input, lrp0, redraw_layer_scales


def _assert_close(R: torch.Tensor, expected: torch.Tensor) -> None:
    # float32 rounding through z-rule divisions and the attention ε (1e-6): ~1e-5 of the largest
    # value; a rule sending relevance to the wrong factor is O(1)
    torch.testing.assert_close(R, expected, rtol=0, atol=1e-3 * float(expected.abs().max()))


class Frozen(nn.Module):
    """A network with a `frozen` switch: the model relprop traces (False) and the reference whose
    constant parts are detached (True)."""

    frozen = False

    def hold(self, t: torch.Tensor) -> torch.Tensor:
        return t.detach() if self.frozen else t


class TalkingHeads(Frozen):
    """CaiT's talking-heads attention: softmax between two linear maps over the heads, `A·V`."""

    def __init__(self, dim: int = 8, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.qkv, self.proj_l, self.proj_w = nn.Linear(dim, 3 * dim), nn.Linear(heads, heads), nn.Linear(heads, heads)
        self.head = nn.Linear(dim, 3)

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        attn = self.proj_l((q @ k.transpose(-2, -1)).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        attn = self.proj_w(attn.softmax(dim=-1).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.head((self.hold(attn) @ v).transpose(1, 2).reshape(B, N, C).mean(1))


class ValuesTimesWeights(Frozen):
    """LeViT-conv's and SHViT's `V·Aᵀ` (the weights the second factor, transposed), and MaxViT's
    einsum spelling of `A·V`."""

    def __init__(self, dim: int = 6, einsum: bool = False) -> None:
        super().__init__()
        self.einsum = einsum
        self.qkv, self.head = nn.Linear(dim, 3 * dim), nn.Linear(dim, 3)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        attn = torch.einsum("bid,bjd->bij", q, k).softmax(-1) if self.einsum else (q @ k.transpose(-2, -1)).softmax(-1)
        attn = self.hold(attn)
        out = torch.einsum("bij,bjd->bid", attn, v) if self.einsum else (v.transpose(-2, -1) @ attn.transpose(-2, -1)).transpose(-2, -1)
        return self.head(out.mean(1))


class Star(Frozen):
    """StarNet's star operation, `act(f1(x)) * f2(x)`: the activated factor is the gate."""

    def __init__(self, bias: bool = True) -> None:
        super().__init__()
        self.f1, self.f2 = nn.Linear(6, 8, bias=bias), nn.Linear(6, 8, bias=bias)
        self.act, self.head = nn.ReLU6(), nn.Linear(8, 3, bias=bias)

    def forward(self, x):
        return self.head(self.hold(self.act(self.f1(x))) * self.f2(x))


class SigmoidGate(Frozen):
    """GhostNetV2's attention: a features map times an upsampled sigmoid gate of its own branch,
    the sigmoid a module."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.short = nn.Conv2d(2, 4, 3, padding=1), nn.Conv2d(2, 4, 1)
        self.gate, self.head = nn.Sigmoid(), nn.Linear(4, 3)

    def forward(self, x):
        gate = F.interpolate(self.gate(self.short(F.avg_pool2d(x, 2))), size=x.shape[-2:], mode="nearest")
        return self.head((torch.relu(self.conv(x)) * self.hold(gate)).mean((2, 3)))


class GRN(Frozen):
    """ConvNeXt-V2's global response normalization with its response N(x) computed from x."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.head = nn.Conv2d(2, 4, 3, padding=1), nn.Linear(4, 3)
        self.gamma, self.beta = nn.Parameter(torch.rand(1, 4, 1, 1)), nn.Parameter(torch.randn(1, 4, 1, 1))

    def forward(self, x):
        h = self.conv(x)
        norm = h.norm(p=2, dim=(2, 3), keepdim=True)
        response = self.hold(norm / (norm.mean(dim=1, keepdim=True) + 1e-6))
        return self.head((h + torch.addcmul(self.beta, self.gamma, h * response)).mean((2, 3)))


class Copies(Frozen):
    """Routes that copy or move elements: reflect and replicate padding, repeat_interleave,
    stack, reshape_as, swapaxes, expand_as, flip, a cast; and a squared ReLU, whose identity rule
    is what the z-rule gives `relu(h) · relu(h)` with one factor held constant (the reference)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.head = nn.Conv2d(2, 3, 3), nn.Linear(2 * 6 * 10 * 10, 3)

    def forward(self, x):
        h = self.conv(F.pad(x, (1, 1, 1, 1), mode="reflect"))
        h = F.pad(h, (1, 1, 1, 1), mode="replicate").repeat_interleave(2, dim=1)[:, :3]
        h = torch.stack([h, h.flip(-1)], dim=1).reshape_as(torch.cat([h, h], dim=1))
        square = torch.relu(h) * self.hold(torch.relu(h)) if self.frozen else torch.relu(h).pow(2)
        flat = (h.swapaxes(2, 3).type_as(x) + square).flatten(1)
        return self.head(flat.unsqueeze(1).expand_as(torch.stack([flat, flat], dim=1)).flatten(1))


def _hold_and_reference(build, x, seed: int = 0, **options: Any) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    model = build().eval()
    R = lrp0(model, x, **options)
    model.frozen = True
    return R, gradient_times_input(model, x)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("build", [TalkingHeads, ValuesTimesWeights, lambda: ValuesTimesWeights(einsum=True)],
                         ids=["talking-heads", "values-times-weights", "einsum"])
def test_cp_holds_attention_weights_constant_wherever_the_softmax_sits(build, seed):
    x = torch.randn(2, 5, 8 if build is TalkingHeads else 6, generator=torch.Generator().manual_seed(seed))
    R, expected = _hold_and_reference(build, x, seed)
    _assert_close(R, expected)


@pytest.mark.parametrize(("build", "gate"), [(Star, 0), (SigmoidGate, 1)], ids=["star", "sigmoid-gate"])
def test_signal_take_all_holds_the_gate_constant(build, gate):
    """The gate read from the graph: ReLU6 over none (star), sigmoid over ReLU (GhostNetV2)."""
    x = torch.randn(3, 6) if build is Star else torch.randn(3, 2, 6, 6)
    R, expected = _hold_and_reference(build, x)
    _assert_close(R, expected)
    steps = [step for step in RelevanceEngine(build().eval()).steps if step.op.name == "scale" and step.info.unrelated]
    assert [step.info.gate for step in steps] == [gate]


def test_the_uniform_rule_gives_each_factor_half():
    """attention='attnlrp' on a bias-free `relu(W1 x) * (W2 x)`: half of gradient × input."""
    torch.manual_seed(0)
    model = Star(bias=False).eval()
    x = torch.randn(3, 6)
    _assert_close(lrp0(model, x, attention="attnlrp"), 0.5 * gradient_times_input(model, x))


def test_cosine_attention_is_the_plain_core_on_normalized_queries_and_keys():
    """torchvision's Swin v2 leaf holds the norms constant inside its q·kᵀ rule; that must be
    what the traced timm Swin v2 gets from the identity rule on `F.normalize` and the plain core."""
    from relprop.core.ops.attention import AttentionCore, AttnLRP

    torch.manual_seed(0)
    q, k, v = torch.randn(3, 2, 2, 5, 4).unbind(0)
    scale, bias = torch.tensor([10.0, 3.0]).reshape(2, 1, 1), 16 * torch.rand(1, 2, 5, 5)
    R = torch.randn(2, 2, 5, 4)
    cosine = AttentionCore(scale, bias, cosine=True).relevance(q, k, v, R, AttnLRP())
    plain = AttentionCore(scale, bias).relevance(F.normalize(q, dim=-1), F.normalize(k, dim=-1), v, R, AttnLRP())
    for ours, reference in zip(cosine, plain, strict=True):
        torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-5)


def test_grn_holds_its_response_constant():
    """constants='leak': β takes its share of the add, as the ε-rule gives it; the rest is x's."""
    R, expected = _hold_and_reference(GRN, torch.randn(2, 2, 5, 5), constants="leak")
    _assert_close(R, expected)


def test_copying_routes_send_each_copy_back_to_its_source():
    R, expected = _hold_and_reference(Copies, torch.randn(2, 2, 8, 8))
    _assert_close(R, expected)


def test_tanh_in_a_head_passes_relevance_unchanged():
    """maxvit's classifier ends Linear → Tanh → Linear: relevance at Tanh's input is its output's,
    which the z-rule of the last (bias-free) layer gives as tanh(z)·w_c."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3, bias=False)).eval()
    x = torch.randn(2, 6)
    logits = model(x)
    target = logits.argmax(1)
    seed = torch.zeros_like(logits).scatter(1, target[:, None], logits.gather(1, target[:, None])).detach()
    _, kept = LRP(model, rules={nn.Linear: Z_RULE}).attribute(x, target=seed, layers=["0", "1"])
    by_hand = torch.tanh(model[0](x)) * model[2].weight[target]
    torch.testing.assert_close(kept["1"], by_hand.detach())
    torch.testing.assert_close(kept["0"], kept["1"])


def test_a_softmax_read_by_a_linear_layer_is_refused_naming_its_reader():
    model = nn.Sequential(nn.Linear(6, 5), nn.Softmax(dim=-1), nn.Linear(5, 3)).eval()
    with pytest.raises(UnsupportedLayerError, match=r"softmax in module '1' \(Softmax\) .*output.*remove that softmax"):
        LRP(model)


# ------------------------------------------------------------------------------------ real models





def _timm(name: str, **kwargs: Any):
    return lambda: pytest.importorskip("timm").create_model(name, pretrained=False, num_classes=5, **kwargs)


def _torchvision(name: str):
    import torchvision

    return lambda: torchvision.models.get_model(name, weights=None, num_classes=5)


# (build, input size, the op that the model needed and where it is seen); ~1 s each on one core
FAST = {
    "convnextv2_atto": (_timm("convnextv2_atto"), 32, "addcmul"),
    "resmlp_12_224": (_timm("resmlp_12_224", img_size=32), 32, "addcmul"),
    "levit_conv_128s": (_timm("levit_conv_128s", img_size=64), 64, "attention-weights"),
    "shvit_s1": (_timm("shvit_s1"), 64, "attention-weights"),
    "efficientformerv2_s0": (_timm("efficientformerv2_s0", img_size=64), 64, "attention-weights"),
    "starnet_s1": (_timm("starnet_s1"), 32, "gate"),
    "mambaout_femto": (_timm("mambaout_femto"), 32, "gate"),
    "edgenext_xx_small": (_timm("edgenext_xx_small"), 64, "normalize"),
    "xcit_nano_12_p16_224": (_timm("xcit_nano_12_p16_224", img_size=32, depth=2), 32, "normalize"),
    "swin_v2_t": (_torchvision("swin_v2_t"), 64, "attention"),
    "levit_128s": (_timm("levit_128s", img_size=64), 64, "reshape_as"),
    "cait_xxs24_224": (_timm("cait_xxs24_224", img_size=32, depth=2), 32, "attention-weights"),
    "eva02_tiny_patch14_224": (_timm("eva02_tiny_patch14_224", img_size=28, depth=2), 28, "type_as"),
    "gcvit_xxtiny": (_timm("gcvit_xxtiny", img_size=64), 64, "repeat_interleave"),
    "tresnet_m": (_timm("tresnet_m"), 64, "pad"),
    "ghostnetv2_100": (_timm("ghostnetv2_100"), 64, "gate"),
    "swinv2_cr_tiny_ns_224": (_timm("swinv2_cr_tiny_ns_224", img_size=64, window_size=4), 64, "normalize"),
    "swinv2_tiny_window8_256": (_timm("swinv2_tiny_window8_256", img_size=64, window_size=4), 64, "normalize"),
}
SLOW = {"maxvit_t": (_torchvision("maxvit_t"), 224, "einsum")}  # its partitions need 224 px: ~10 s


def _uses(engine: RelevanceEngine, what: str) -> bool:
    """Whether the plan takes the path this model needed (not merely anything that conserves)."""
    for step in engine.steps:
        node = step.node
        if what == "attention-weights" and step.op.name == "matmul" and step.info.attention_weights is not None:
            return True
        if what == "gate" and step.op.name == "scale" and step.info.unrelated and step.info.gate is not None:
            return True
        if what == "attention" and step.op.name == "attention":
            return True
        if what == "einsum" and step.op.name == "matmul" and node.target is torch.einsum:
            return True
        if what in ("addcmul",) and step.op.name == what:
            return True
        if what in ("normalize", "pad") and step.op.name in ("passthrough", "route") and getattr(
                node.target, "__name__", "") == what:
            return True
        if what in ("reshape_as", "type_as", "repeat_interleave") and node.target == what:
            return True
    return False


def _explain(build, size: int, what: str) -> None:
    torch.manual_seed(0)
    model = redraw_layer_scales(build())
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        probability = model(x).softmax(-1).max(-1).values
    lrp = LRP(model)  # verify="first": the fidelity check runs on this call
    R, sums = lrp.attribute(x, return_layer_sums=True)
    assert _uses(lrp.engine, what)
    assert torch.isfinite(R).all()
    torch.testing.assert_close(R.flatten(1).sum(1), probability, rtol=0.05, atol=0)
    torch.testing.assert_close(sums["output"], probability)


@pytest.mark.parametrize("name", sorted(FAST))
def test_newer_families_are_explained(name):
    _explain(*FAST[name])


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SLOW))
def test_newer_families_are_explained_slow(name):
    _explain(*SLOW[name])


class Normalized(Frozen):
    """`relu(h) / d(h)`: a divisor computed from the value it divides (`g(x) / x`'s kind) and a
    sibling divisor read from the same tensor (EfficientViT's `out[..., :-1] / out[..., -1:]`)."""

    def __init__(self) -> None:
        super().__init__()
        self.body, self.head = nn.Linear(6, 7), nn.Linear(6, 3)

    def forward(self, x):
        h = self.body(x)
        out = torch.relu(h)[:, :-1] / self.hold(torch.exp(h[:, -1:]) + 1)
        out = out / self.hold(out.abs().sum(1, keepdim=True) + 1)
        return self.head(out)


def test_a_divisor_is_held_constant_and_never_taken_for_the_signal():
    """Before, `g(x) / x` sent all relevance to the divisor x as if it were `x · g(x)`, and then
    every input-dependent divisor was refused; a divisor is a normalizer held constant: LRP-0 is
    gradient × input of the same network with its divisors detached."""
    torch.manual_seed(0)
    model, x = Normalized().eval(), torch.randn(4, 6)
    R = lrp0(model, x)
    model.frozen = True
    _assert_close(R, gradient_times_input(model, x))


def test_a_log_softmax_is_refused_with_both_fixes():
    model = nn.Sequential(nn.Linear(6, 3), nn.LogSoftmax(dim=1)).eval()
    with pytest.raises(UnsupportedLayerError, match=r"LogSoftmax.*output, remove it.*rules=\{torch.nn.LogSoftmax"):
        LRP(model)


class SpatialGatingUnit(nn.Module):
    """gMLP: GELU, then `u, v = chunk`, `u * proj(v)`: the GELU belongs to both halves, so the
    graph does not say which factor gates; taking `u` (it 'leaves' the GELU through the chunk) for
    the gate would send all relevance through the spatial projection."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.proj, self.head = nn.Linear(6, 8), nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x):
        u, v = F.gelu(self.fc(x)).chunk(2, dim=-1)
        return self.head(u * self.proj(v))


def test_a_gate_the_graph_cannot_tell_is_refused_on_request_and_split_under_attnlrp():
    """CP's default takes the uniform rule here (tests/test_gates_and_mixing.py); refusal on request."""
    torch.manual_seed(0)  # the ε-rule's stabilizer moves the total by ~1e-4 on an unlucky draw
    model = SpatialGatingUnit().eval()
    with pytest.raises(UnsupportedLayerError, match="cannot tell the gate from the signal.*attention='attnlrp'"):
        LRP(model, attention=ConservativeAttention(ambiguous="refuse")).attribute(torch.randn(2, 6))
    R, sums = LRP(model, attention="attnlrp").attribute(torch.randn(2, 6), return_layer_sums=True)
    torch.testing.assert_close(R.sum(1), sums["output"], rtol=1e-4, atol=1e-6)
