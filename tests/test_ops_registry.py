"""Tests over the op registry, timm-style: every registered op has an example network whose nodes it
claims, and relevance through that network conserves on random inputs (hypothesis). A new op
without an example here fails `test_every_op_has_an_example`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from relprop import LRP
from relprop.core.interpreter import RelevanceEngine
from relprop.core.ops import all_ops
from relprop.errors import UnsupportedLayerError


class Residual(nn.Module):
    """add: a residual block with an identity skip."""

    def __init__(self, width: int = 6) -> None:
        super().__init__()
        self.inner = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width))
        self.head = nn.Linear(width, 3)

    def forward(self, x):
        return self.head(torch.relu(x + self.inner(x)))


class TwoBranches(nn.Module):
    """cat: two branches concatenated along the features."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.head = nn.Linear(6, 4), nn.Linear(6, 2), nn.Linear(6, 3)

    def forward(self, x):
        return self.head(torch.cat([torch.relu(self.a(x)), self.b(x)], dim=1))


class Gated(nn.Module):
    """scale: a constant factor and a gate computed from the operand itself (SiLU spelled out)."""

    def __init__(self) -> None:
        super().__init__()
        self.body, self.head = nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x):
        h = self.body(x) * 0.5
        return self.head(h * torch.sigmoid(h))


class Routed(nn.Module):
    """route: reshapes, permutes, slices and zero padding; meta: sizes read from the input."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.head = nn.Conv2d(2, 3, 3, padding=1), nn.Linear(3 * 6 * 5, 3)

    def forward(self, x):
        h = F.pad(self.conv(x), (0, 1)).permute(0, 2, 3, 1)[:, :, :5]
        return self.head(h.reshape(x.size(0), -1))


class Pooled(nn.Module):
    """pool: average pooling, a functional mean and nearest upsampling."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.pool, self.head = nn.Conv2d(2, 4, 3, padding=1), nn.AvgPool2d(2), nn.Linear(4, 3)

    def forward(self, x):
        h = F.interpolate(self.pool(torch.relu(self.conv(x))), scale_factor=2.0, mode="nearest")
        return self.head(h.mean((2, 3)))


class MaxPooled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.head = nn.Conv2d(2, 4, 3, padding=1), nn.Linear(4 * 3 * 3, 3)

    def forward(self, x):
        return self.head(torch.flatten(F.max_pool2d(torch.relu(self.conv(x)), 2), 1))


class SelfAttention(nn.Module):
    """softmax and matmul: attention written out, softmax(QKᵀ/√d)·V."""

    def __init__(self, dim: int = 4) -> None:
        super().__init__()
        self.qkv, self.proj, self.head = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim), nn.Linear(dim, 3)
        self.scale = dim ** -0.5

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        weights = torch.softmax(q @ k.transpose(-2, -1) * self.scale, dim=-1)
        return self.head(self.proj(weights @ v).mean(1))


class TorchAttention(nn.Module):
    """attention: torch's nn.MultiheadAttention as one node, with a LayerNorm before it."""

    def __init__(self, dim: int = 4) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attention = nn.MultiheadAttention(dim, num_heads=2, batch_first=True)
        self.head = nn.Linear(dim, 3)

    def forward(self, x):
        h = self.norm(x)
        return self.head(self.attention(h, h, h, need_weights=False)[0].mean(1))


class Shifted(nn.Module):
    """constant: a learned offset (a get_attr node) added to the features."""

    def __init__(self) -> None:
        super().__init__()
        self.body, self.head = nn.Linear(6, 6), nn.Linear(6, 3)
        self.offset = nn.Parameter(torch.randn(6))

    def forward(self, x):
        return self.head(torch.relu(self.body(x) + self.offset))


class Assigned(nn.Module):
    """assign: item assignment into an activation (the capture path records it; fx cannot)."""

    def __init__(self) -> None:
        super().__init__()
        self.body, self.branch, self.head = nn.Linear(6, 6), nn.Linear(6, 2), nn.Linear(6, 3)

    def forward(self, x):
        x = self.body(x)
        x[:, 1:3] = self.branch(torch.relu(x))
        return self.head(torch.relu(x))


class GlobalResponseNorm(nn.Module):
    """addcmul: ConvNeXt-V2's GRN, `x + addcmul(β, γ, x·N(x))` with N(x) computed from x, and an
    affine `addcmul(β, α, x)` as ResMLP writes it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.head = nn.Conv2d(2, 4, 3, padding=1), nn.Linear(4, 3)
        self.gamma, self.beta = nn.Parameter(torch.rand(1, 4, 1, 1)), nn.Parameter(torch.randn(1, 4, 1, 1))
        self.alpha = nn.Parameter(torch.rand(4))

    def forward(self, x):
        h = self.conv(x)
        norm = h.norm(p=2, dim=(2, 3), keepdim=True)
        h = h + torch.addcmul(self.beta, self.gamma, h * (norm / (norm.mean(dim=1, keepdim=True) + 1e-6)))
        return self.head(torch.addcmul(self.beta.flatten(), self.alpha, h.mean((2, 3))))


class Square(nn.Module):
    """A module relprop has no op for: claimed by `custom` once the user gives it a rule."""

    def forward(self, x):
        return x * x


class Recurrent(nn.Module):
    """A bidirectional two-layer LSTM over tokens (Sequencer's rows and columns), averaged."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm, self.head = nn.LSTM(4, 3, 2, batch_first=True, bidirectional=True), nn.Linear(6, 3)

    def forward(self, x):
        return self.head(self.lstm(x)[0].mean(1))


def _vectors(batch: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randn(batch, 6, generator=generator)


def _images(batch: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randn(batch, 2, 6, 6, generator=generator)


def _tokens(batch: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randn(batch, 5, 4, generator=generator)


@dataclass
class Example:
    """A network in which the op claims at least one node, and how to feed it."""

    model: Callable[[], nn.Module]
    inputs: Callable[[int, torch.Generator], torch.Tensor]
    options: dict[str, Any] = field(default_factory=dict)
    # relative conservation error allowed: float32 rounding, unless the op's rule absorbs some
    rtol: float = 1e-4


# Attention products take LXT's bilinear ε-rule (ε = 1e-6 on each output): an output z keeps
# ε/(z + ε) of its relevance, which reaches ~5e-4 of the total for outputs near 0 (measured
# worst over 100 seeds: 2.8e-4 for softmax/matmul, 2.6e-4 for nn.MultiheadAttention).
EPSILON_RULE_RTOL = 2e-3


EXAMPLES: dict[str, Example] = {
    "linear": Example(lambda: nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)), _vectors),
    "passthrough": Example(lambda: nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Dropout(),
                                                 nn.Linear(5, 3)), _vectors),
    "maxpool": Example(MaxPooled, _images),
    "pool": Example(Pooled, _images),
    "route": Example(Routed, _images),
    "meta": Example(Routed, _images),
    "add": Example(Residual, _vectors),
    "cat": Example(TwoBranches, _vectors),
    "scale": Example(Gated, _vectors),
    "addcmul": Example(GlobalResponseNorm, _images),
    "softmax": Example(SelfAttention, _tokens, rtol=EPSILON_RULE_RTOL),
    "matmul": Example(SelfAttention, _tokens, rtol=EPSILON_RULE_RTOL),
    "attention": Example(TorchAttention, _tokens, rtol=EPSILON_RULE_RTOL),
    "constant": Example(Shifted, _vectors, {"constants": "input"}),
    "custom": Example(lambda: nn.Sequential(nn.Linear(6, 5), Square(), nn.Linear(5, 3)), _vectors,
                      {"rules": {Square: "pass"}}),
    "input": Example(lambda: nn.Sequential(nn.Linear(6, 3)), _vectors),
    "output": Example(lambda: nn.Sequential(nn.Linear(6, 3)), _vectors),
    "assign": Example(Assigned, _vectors),
    "recurrent": Example(Recurrent, _tokens, rtol=EPSILON_RULE_RTOL),  # ε on signed sums: float32 cancellation
}
# The one op that carries no relevance: it stands for a refusal (tested below).
REFUSING = {"unsupported"}


def _randomized(example: Example, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = example.model()
    for module in model.modules():  # running statistics that are not the identity
        if isinstance(module, nn.BatchNorm1d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 1.5)
    return model.eval()


def test_every_op_has_an_example():
    names = {op.name for op in all_ops()}
    assert names == set(EXAMPLES) | REFUSING, "give each new op an example network in EXAMPLES"


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_the_example_is_claimed_by_its_op(name):
    example = EXAMPLES[name]
    engine = RelevanceEngine(_randomized(example, 0), **example.options)
    engine.forward(example.inputs(2, torch.Generator().manual_seed(0)))  # a capture's steps come with an input
    assert name in {step.op.name for step in engine.steps}


@pytest.mark.parametrize("name", sorted(EXAMPLES))
@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 2**16), batch=st.integers(1, 3))
def test_the_op_conserves_on_random_inputs(name, seed, batch):
    example = EXAMPLES[name]
    model = _randomized(example, seed)
    x = example.inputs(batch, torch.Generator().manual_seed(seed))
    R, sums = LRP(model, **example.options).attribute(x, return_layer_sums=True)
    assert torch.isfinite(R).all()
    torch.testing.assert_close(R.flatten(1).sum(1), sums["output"], rtol=example.rtol, atol=1e-6)


def test_a_node_no_op_claims_is_refused_with_the_key_that_adds_a_rule():
    model = nn.Sequential(nn.Linear(6, 5), nn.Softplus(), nn.Linear(5, 3)).eval()
    with pytest.raises(UnsupportedLayerError, match=r"module '1' \(Softplus\).*rules=\{torch.nn.Softplus: rule\}"):
        LRP(model).attribute(torch.randn(2, 6))


# Real architectures: every node claimed by the op one expects. Counts derived by hand from the
# architecture (comments), independent of the registry.
def _real_models() -> dict[str, tuple[Callable[[], nn.Module], dict[str, int]]]:
    import torchvision
    from torchvision.models.swin_transformer import SwinTransformer
    from torchvision.models.vision_transformer import VisionTransformer

    return {
        # 20 convs + fc; 20 BN + 17 ReLU calls (two per block, one in the stem); one add per block
        "torchvision-resnet18": (lambda: torchvision.models.resnet18(num_classes=3),
                                 {"linear": 21, "passthrough": 37, "add": 8, "maxpool": 1, "pool": 1,
                                  "route": 1, "input": 1, "output": 1}),
        # per block: attention, 2 MLP linears, 2 adds; plus patch conv, head, the position add
        "torchvision-vit": (lambda: VisionTransformer(image_size=32, patch_size=16, num_layers=2, num_heads=2,
                                                      hidden_dim=8, mlp_dim=16, num_classes=3),
                            {"linear": 6, "attention": 2, "add": 5, "cat": 1}),
        # per block: window attention, 2 adds; patch conv, 2 MLP linears x 2, patch-merging, head
        "torchvision-swin": (lambda: SwinTransformer(patch_size=[4, 4], embed_dim=8, depths=[1, 1],
                                                     num_heads=[1, 2], window_size=[2, 2], num_classes=3),
                             {"linear": 7, "attention": 2, "add": 4, "pool": 1}),
        # 12 blocks (2+2+6+2): depthwise conv + 2 pointwise linears, a layer scale, an add each;
        # stem, 3 downsampling convs, head
        "timm-convnext_atto": (lambda: _timm("convnext_atto"),
                               {"linear": 41, "add": 12, "scale": 12, "pool": 1}),
        # 2 blocks: qkv + proj inside the attention op's linears, 2 MLP linears; patch conv, head
        "timm-vit_tiny": (lambda: _timm("vit_tiny_patch16_224", depth=2, img_size=32),
                          {"attention": 2, "add": 5, "cat": 1}),
    }


def _timm(name: str, **kwargs: Any) -> nn.Module:
    timm = pytest.importorskip("timm")
    return timm.create_model(name, pretrained=False, num_classes=3, **kwargs)


MODULE_OPS: dict[type[nn.Module], str] = {
    nn.Conv2d: "linear", nn.Linear: "linear", nn.BatchNorm2d: "passthrough", nn.LayerNorm: "passthrough",
    nn.ReLU: "passthrough", nn.GELU: "passthrough", nn.Dropout: "passthrough", nn.Identity: "passthrough",
    nn.MaxPool2d: "maxpool", nn.AdaptiveAvgPool2d: "pool", nn.Flatten: "route",
    nn.MultiheadAttention: "attention",
}


@pytest.mark.parametrize("name", ["torchvision-resnet18", "torchvision-vit", "torchvision-swin",
                                  "timm-convnext_atto", "timm-vit_tiny"])
def test_real_models_have_every_node_claimed_by_the_expected_op(name):
    build, expected = _real_models()[name]
    torch.manual_seed(0)
    engine = RelevanceEngine(build().eval())
    counts: dict[str, int] = {}
    for step in engine.steps:
        counts[step.op.name] = counts.get(step.op.name, 0) + 1
        if step.module is not None and type(step.module) in MODULE_OPS:
            assert step.op.name == MODULE_OPS[type(step.module)], step.node.target
    assert "unsupported" not in counts
    for op, count in expected.items():
        assert counts.get(op, 0) == count, (op, counts)
    if name == "torchvision-resnet18":  # every node accounted for
        assert counts == expected
    R = LRP(engine.model).attribute(torch.randn(1, 3, 32, 32))
    assert torch.isfinite(R).all()


class PoolMinusInput(nn.Module):
    """PoolFormer's token mixer, `pool(x) - x`: tensor arithmetic, not a shape."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.pool, self.head = nn.Conv2d(2, 4, 3, padding=1), nn.AvgPool2d(3, 1, 1), nn.Linear(4, 3)

    def forward(self, x):
        h = self.conv(x)
        return self.head((h + (self.pool(h) - h)).mean((2, 3)))


class DoubleTranspose(nn.Module):
    """`x.mT` reads a tensor-valued attribute: its values, not a shape."""

    def __init__(self) -> None:
        super().__init__()
        self.body, self.head = nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x):
        return self.head(self.body(x).mT.mT)


def test_tensor_values_are_never_taken_for_a_shape():
    """A shape carries no relevance, so a tensor taken for one would silently cut its branch while
    conservation still held (PoolFormer's token mixer was): a subtraction is an add of the negated
    operand, a tensor-valued attribute is refused."""
    torch.manual_seed(0)
    engine = RelevanceEngine(PoolMinusInput().eval())
    assert [step.op.name for step in engine.steps if step.node.name == "sub"] == ["add"]
    with pytest.raises(UnsupportedLayerError, match="rules={builtins.getattr: rule}"):
        LRP(DoubleTranspose().eval()).attribute(_vectors(2, torch.Generator().manual_seed(0)))
