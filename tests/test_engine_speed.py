"""The engine's fast paths give the numbers of the slow ones: ε's denominator from the recorded
output, attention parts kept from the forward pass, values released during the forward pass,
the one-temporary stabilizer. Speed itself is measured in benchmarks/, never asserted here."""

from __future__ import annotations

import pytest
import torch
import torchvision
from test_transformers import small_swin, timm_vit, torchvision_vit
from torch import nn

from relprop import LRP, Composite
from relprop.core.linear_op import module_forward
from relprop.core.numerics import (
    DENOMINATOR,
    FOLDED_WEIGHT,
    NEGATIVE_WEIGHT,
    POSITIVE_WEIGHT,
    stabilize,
)
from relprop.core.ops import OPS, register_op
from relprop.core.ops.base import Op
from relprop.core.ops.maxpool import AverageWindows, WinnerTakesAll
from relprop.core.rules import EpsilonRule, GammaRule
from relprop.errors import UnsupportedLayerError

LXT_CHOICES = Composite(rules={nn.Linear: "epsilon", nn.Conv2d: "epsilon", nn.LayerNorm: "norm-epsilon"},
                        input_rule="epsilon", split="signed", attention="cp", constants="leak")


def small_resnet() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10).eval()


def small_convnext() -> nn.Module:
    torch.manual_seed(0)
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt
    return ConvNeXt([CNBlockConfig(16, 32, 1), CNBlockConfig(32, None, 1)], num_classes=10).eval()


def test_stabilizer_equals_z_plus_epsilon_times_sign_bit_for_bit():
    z = torch.randn(1000, dtype=torch.float64)
    z[:10] = 0.0
    z[10:20] = -0.0  # −0 >= 0: it moves to +ε, as a zero does
    z[20:25] = torch.tensor([1e-7, -1e-7, 1e-300, -1e-300, 5e-7])
    for dtype in (torch.float32, torch.float64):
        t = z.to(dtype)
        sign = torch.where(t >= 0, torch.ones_like(t), -torch.ones_like(t))
        for epsilon in (1e-6, 0.25, 0.0):
            expected = t + epsilon * sign
            assert torch.equal(stabilize(t, epsilon), expected)
            assert torch.equal(stabilize(t, epsilon).signbit(), expected.signbit())


@pytest.mark.parametrize("layer", [nn.Linear(7, 5), nn.Conv2d(3, 4, 3, padding=1, stride=2)])
@pytest.mark.parametrize("epsilon", [1e-6, 0.0])
def test_epsilon_from_the_recorded_output_equals_recomputing_it(layer, epsilon):
    torch.manual_seed(0)
    a = torch.randn(2, 7) if isinstance(layer, nn.Linear) else torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        output = module_forward(layer, (a,), {})  # what the engine records for the layer
    R = torch.randn_like(output)
    rule = EpsilonRule(epsilon)
    assert torch.equal(rule.relevance_from_output(layer, a, R, output), rule.relevance(layer, a, R))


def test_a_subclass_that_changes_the_rule_recomputes():
    """γ overrides `relevance`: given a wrong output it must not use it."""
    layer, a = nn.Linear(4, 3), torch.randn(2, 4)
    R = torch.randn(2, 3)
    rule = GammaRule()
    assert torch.equal(rule.relevance_from_output(layer, a, R, torch.full((2, 3), 1e9)), rule.relevance(layer, a, R))


MODELS = {
    "resnet18": (small_resnet, {}, (2, 3, 32, 32)),
    "convnext": (small_convnext, {}, (2, 3, 32, 32)),
    "timm-vit": (timm_vit, {}, (2, 3, 32, 32)),
    "timm-vit-lxt": (timm_vit, {"composite": LXT_CHOICES}, (2, 3, 32, 32)),
    "torchvision-vit-lxt": (torchvision_vit, {"composite": LXT_CHOICES}, (2, 3, 32, 32)),
    "swin-lxt": (small_swin, {"composite": LXT_CHOICES}, (1, 3, 40, 40)),
}


@pytest.mark.parametrize("name", MODELS)
def test_released_values_change_no_relevance(name):
    """The forward pass releases what the walk never reads: the same relevance, bit for bit, at
    the input and at every reported cut, as with every value kept; and it does release some."""
    build, options, shape = MODELS[name]
    explainer = LRP(build(), **options)
    torch.manual_seed(1)
    x = torch.randn(*shape)
    explainer.attribute(x)  # verified once
    engine = explainer.engine
    full, lean = engine.forward(x, keep="all"), engine.forward(x)
    released = [node for node, value in lean.values.items()
                if isinstance(value, torch.Tensor) and value.device.type == "meta"]
    assert released, "nothing was released"
    seed = torch.zeros_like(full.output)
    seed[:, 3] = full.output[:, 3]
    ours, theirs = engine.backward(lean, seed, layer_sums=True), engine.backward(full, seed, layer_sums=True)
    assert torch.equal(ours.input, theirs.input)
    assert ours.layer_sums.keys() == theirs.layer_sums.keys()
    for key in ours.layer_sums:
        assert torch.equal(ours.layer_sums[key], theirs.layer_sums[key])


@pytest.mark.parametrize("build", [torchvision_vit, small_swin])
def test_attention_parts_kept_from_the_forward_give_the_recomputed_relevance(build):
    """Attention modules record their output by their decomposition and keep its parts; without
    them the relevance recomputes the parts from the module's own output (checked against it)."""
    explainer = LRP(build(), composite=LXT_CHOICES)
    x = torch.randn(1, 3, 40, 40) if build is small_swin else torch.randn(1, 3, 32, 32)
    explainer.attribute(x)
    engine = explainer.engine
    record = engine.forward(x, keep="all")
    assert record.values.parts, "no attention parts were kept"
    seed = torch.zeros_like(record.output)
    seed[:, 2] = record.output[:, 2]
    kept = engine.backward(record, seed).input
    record.values.parts.clear()
    recomputed = engine.backward(record, seed).input
    torch.testing.assert_close(kept, recomputed, rtol=1e-5, atol=1e-7)


def test_a_released_value_is_no_number():
    """A stand-in read for its values fails loudly instead of giving numbers."""
    explainer = LRP(small_resnet())
    x = torch.randn(1, 3, 32, 32)
    explainer.attribute(x)
    values = explainer.engine.forward(x).values
    stand_in = next(v for v in values.values() if isinstance(v, torch.Tensor) and v.device.type == "meta")
    with pytest.raises((RuntimeError, NotImplementedError)):
        float(stand_in.sum())


class _Doubling(Op):
    """An op that does not say what it reads (as an op written before `backward_reads`)."""

    name = "test-doubling"

    def claim(self, node) -> bool:
        return node.op == "call_function" and node.target is _double

    def relevance(self, step, values, R, context):
        return [(step.inputs[0], R.reshape(values[step.inputs[0]].shape))]


def _double(x: torch.Tensor) -> torch.Tensor:
    return 2 * x


torch.fx.wrap("_double")


class _WithDoubling(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 4, 3), nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(_double(torch.relu(self.conv(x))).mean((2, 3)))


def test_an_op_that_does_not_say_what_it_reads_keeps_every_value():
    op = register_op(_Doubling())
    try:
        explainer = LRP(_WithDoubling().eval())
        x = torch.rand(1, 3, 8, 8)
        R, sums = explainer.attribute(x, return_layer_sums=True)
        values = explainer.engine.forward(x).values
        assert not any(isinstance(v, torch.Tensor) and v.device.type == "meta" for v in values.values())
        torch.testing.assert_close(sums["input"], sums["output"])
    finally:
        OPS.remove(op)


def _random_layer_norm(shape: tuple[int, ...], affine: bool) -> tuple[nn.LayerNorm, torch.Tensor, torch.Tensor]:
    """A LayerNorm with random affine parameters, an input batch and a relevance for its output."""
    torch.manual_seed(0)
    norm = nn.LayerNorm(shape, elementwise_affine=affine)
    if affine:
        nn.init.normal_(norm.weight)
        nn.init.normal_(norm.bias)
    a = torch.randn(2, 5, *shape)
    return norm, a, torch.randn_like(a)


@pytest.mark.parametrize("shape,affine", [((8,), True), ((4, 6), True), ((6,), False)])
def test_norm_epsilon_transpose_written_out_equals_autograd_bit_for_bit(shape, affine):
    """LayerNorm with its std held constant: the transpose of the normalization written out
    gives autograd's vjp of it, the rule's previous implementation."""
    from relprop.core.numerics import vjp
    from relprop.core.rules import NormEpsilonRule

    norm, a, R = _random_layer_norm(shape, affine)
    dims = tuple(range(-len(shape), 0))
    std = (a.var(dims, unbiased=False, keepdim=True) + norm.eps).sqrt()
    weight = norm.weight.detach() if affine else 1.0
    bias = norm.bias.detach() if affine else 0.0

    def normalize(t):
        return (t - t.mean(dims, keepdim=True)) / std * weight

    expected = a * vjp(normalize, a, R / stabilize(normalize(a) + bias, 1e-6))
    assert torch.equal(NormEpsilonRule().relevance(norm, a, R), expected)


@pytest.mark.parametrize("shape,affine", [((8,), True), ((4, 6), True), ((6,), False)])
@pytest.mark.parametrize("epsilon", [1e-6, 0.0])
def test_norm_epsilon_from_the_forward_statistics_equals_recomputing_them(shape, affine, epsilon):
    """The walk takes LayerNorm's output and rstd from `torch.native_layer_norm` (the kernel
    `F.layer_norm` runs: the same output bit for bit) instead of recomputing the variance."""
    from relprop.core.rules import NormEpsilonRule

    norm, a, R = _random_layer_norm(shape, affine)
    with torch.no_grad():
        output, _, rstd = torch.native_layer_norm(a, shape, norm.weight, norm.bias, norm.eps)
        assert torch.equal(output, norm(a))
        rule = NormEpsilonRule(epsilon)
        expected = rule.relevance(norm, a, R)
        # float rounding of the variance and the output, amplified where the output is near 0
        torch.testing.assert_close(rule.relevance_from_stats(norm, a, R, output, rstd), expected,
                                   rtol=1e-4, atol=1e-5 * float(expected.abs().max()))


def test_a_norm_rule_that_changes_the_rule_ignores_the_statistics():
    from relprop.core.rules import NormEpsilonRule

    class Halved(NormEpsilonRule):
        def relevance(self, layer, a, R):
            return super().relevance(layer, a, R) / 2

    norm, a = nn.LayerNorm(6), torch.randn(3, 6)
    R = torch.randn(3, 6)
    wrong = torch.full((3, 6), 1e9)
    assert torch.equal(Halved().relevance_from_stats(norm, a, R, wrong, wrong[:, :1]), Halved().relevance(norm, a, R))


@pytest.mark.parametrize("build,shape", [(small_convnext, (2, 3, 32, 32)), (torchvision_vit, (2, 3, 32, 32)),
                                         (timm_vit, (2, 3, 32, 32)), (small_swin, (1, 3, 40, 40))])
def test_layer_norm_statistics_kept_from_the_forward_give_the_recomputed_relevance(build, shape):
    """Every LayerNorm under norm-ε (modules, and `F.layer_norm` inside torchvision's
    LayerNorm2d and timm's LayerNorm) keeps its rstd; dropping the kept parts makes the walk
    recompute them: the same relevance to float rounding, and the same layer sums."""
    explainer = LRP(build(), composite=LXT_CHOICES)
    torch.manual_seed(1)
    x = torch.randn(*shape)
    explainer.attribute(x)
    engine = explainer.engine
    record = engine.forward(x, keep="all")
    norms = [s.node for s in engine.steps
             if isinstance(s.module, nn.LayerNorm) or s.node.target is torch.nn.functional.layer_norm]
    assert norms and all(isinstance(record.values.parts.get(node), torch.Tensor) for node in norms)
    seed = torch.zeros_like(record.output)
    seed[:, 2] = record.output[:, 2]
    kept = engine.backward(record, seed, layer_sums=True)
    record.values.parts.clear()
    recomputed = engine.backward(record, seed, layer_sums=True)
    torch.testing.assert_close(kept.input, recomputed.input, rtol=1e-4, atol=1e-5 * float(kept.input.abs().max()))
    for key in kept.layer_sums:
        torch.testing.assert_close(kept.layer_sums[key], recomputed.layer_sums[key], rtol=1e-5, atol=1e-6)


class _RecomputingEpsilon(EpsilonRule):
    """ε with its own (unchanged) weights: the rule then recomputes z by a forward product."""

    def _weights(self, op):
        return op.weight, op.bias


def _conv_bn_net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    for module in net.modules():
        if isinstance(module, nn.BatchNorm2d):  # statistics as after training, scales of both signs
            nn.init.normal_(module.running_mean, std=0.5)
            nn.init.uniform_(module.running_var, 0.5, 2.0)
            nn.init.normal_(module.weight)
            nn.init.normal_(module.bias, std=0.2)
    return net.eval()


def test_epsilon_under_a_folded_batchnorm_takes_the_recorded_batchnorm_output(monkeypatch):
    """ε at a conv with a BatchNorm folded in divides by the recorded BatchNorm output (the
    folded map to float rounding) instead of recomputing it: no forward product in the walk,
    and the map of the recomputing rule to float rounding."""
    from relprop.core.linear_op import LinearOp

    torch.manual_seed(1)
    x = torch.randn(2, 3, 16, 16)
    maps, forward_calls = {}, {}
    original, calls = LinearOp.forward, []

    def counted(self, *args):
        calls.append(1)
        return original(self, *args)

    for name, rule in (("recorded", EpsilonRule()), ("recomputed", _RecomputingEpsilon())):
        explainer = LRP(_conv_bn_net(), composite=Composite(rules={nn.Conv2d: rule, nn.Linear: rule}, input_rule=rule,
                                                             bn="fold"))
        explainer.attribute(x)
        record = explainer.engine.forward(x)
        seed = torch.zeros_like(record.output)
        seed[:, 1] = record.output[:, 1]
        calls.clear()
        monkeypatch.setattr(LinearOp, "forward", counted)
        maps[name] = explainer.engine.backward(record, seed, layer_sums=True)
        monkeypatch.setattr(LinearOp, "forward", original)
        forward_calls[name] = len(calls)
    assert forward_calls == {"recorded": 0, "recomputed": 3}  # two folded convs and the head
    ours, theirs = maps["recorded"], maps["recomputed"]
    # float rounding, amplified where a denominator is near 0 (one pixel in 1536 at 1.5e-5 of the largest)
    torch.testing.assert_close(ours.input, theirs.input, rtol=1e-3, atol=1e-4 * float(theirs.input.abs().max()))
    assert float(torch.corrcoef(torch.stack([ours.input.flatten(), theirs.input.flatten()]))[0, 1]) > 0.999999
    for key in ours.layer_sums:
        torch.testing.assert_close(ours.layer_sums[key], theirs.layer_sums[key], rtol=1e-4, atol=1e-6)


def test_a_conv_output_under_a_folded_batchnorm_is_released():
    """The folded BatchNorm reads the conv's output for its shape only: the recording forward
    releases it (the default composite reads neither it nor the BatchNorm's output)."""
    explainer = LRP(small_resnet(), composite=Composite(bn="fold"))
    torch.manual_seed(1)
    x = torch.randn(1, 3, 32, 32)
    explainer.attribute(x)
    values = explainer.engine.forward(x).values
    folded = [step.node for step in explainer.engine.steps
              if getattr(step.info, "fold_after", None) is not None]
    assert folded and all(values[node].device.type == "meta" for node in folded)


def test_the_stabilizer_writes_where_it_is_told_the_same_bits():
    z = torch.randn(4, 7)
    z[0, :3] = torch.tensor([0.0, -0.0, 1e-40])
    out = torch.empty(28).view(4, 7)
    assert torch.equal(stabilize(z, 1e-6, out=out), stabilize(z, 1e-6)) and out.data_ptr() != z.data_ptr()
    assert torch.equal(out.signbit(), stabilize(z, 1e-6).signbit())


@pytest.mark.parametrize("build,shape,composite,slots", [
    (small_convnext, (2, 3, 32, 32), LXT_CHOICES, {DENOMINATOR}),
    (torchvision_vit, (2, 3, 32, 32), LXT_CHOICES, {DENOMINATOR}),
    (_conv_bn_net, (2, 3, 16, 16), LXT_CHOICES, {DENOMINATOR, FOLDED_WEIGHT}),  # ε under folded BatchNorms
    (small_resnet, (2, 3, 32, 32), Composite(), {POSITIVE_WEIGHT}),  # z+ (the default)
    (small_resnet, (2, 3, 32, 32), Composite(bn="fold", input_rule="flat"), {POSITIVE_WEIGHT, FOLDED_WEIGHT}),
    (small_convnext, (2, 3, 32, 32), Composite(), {POSITIVE_WEIGHT, NEGATIVE_WEIGHT}),  # z+ on signed inputs
    (small_resnet, (2, 3, 32, 32), Composite(rules={nn.Conv2d: "alpha2beta1"}, bn="fold"),
     {POSITIVE_WEIGHT, NEGATIVE_WEIGHT, FOLDED_WEIGHT}),  # αβ: both signs of a folded weight
])
def test_the_walks_scratch_space_changes_no_relevance(build, shape, composite, slots, monkeypatch):
    """ε's denominators, w⁺ and w⁻ (z+, αβ) and the per-call folded weights go into buffers reused across
    the walk: the relevance and every layer sum are those of fresh temporaries, bit for bit (a
    value escaping into the scratch would be overwritten by a later layer), and there is no
    scratch outside a walk."""
    from relprop.core import numerics, rules
    from relprop.core.ops import linear

    explainer = LRP(build(), composite=composite)
    torch.manual_seed(1)
    x = torch.randn(*shape)
    explainer.attribute(x)
    record = explainer.engine.forward(x)
    seed = torch.zeros_like(record.output)
    seed[:, 2] = record.output[:, 2]
    used = []
    original = numerics.scratch_like

    def watched(z, slot=DENOMINATOR):
        buffer = original(z, slot)
        if buffer is not None:
            used.append(slot)
        return buffer

    for module in (rules, linear):
        monkeypatch.setattr(module, "scratch_like", watched)
    reused = explainer.engine.backward(record, seed, layer_sums=True)
    assert set(used) == slots
    for module in (rules, linear):
        monkeypatch.setattr(module, "scratch_like", lambda z, slot=None: None)
    fresh = explainer.engine.backward(record, seed, layer_sums=True)
    assert torch.equal(reused.input, fresh.input)
    assert reused.layer_sums.keys() == fresh.layer_sums.keys()
    for key in fresh.layer_sums:
        assert torch.equal(reused.layer_sums[key], fresh.layer_sums[key])
    assert numerics.scratch_like(torch.ones(3)) is None


def test_positive_weights_are_not_kept_between_calls_unless_asked():
    """w⁺ of every layer held for the explainer's lifetime was over half the input gradient's peak
    memory at batch 1 (ResNet-50: 97 MiB); it is clamped per call unless `cache_weights=True`,
    and both give the same map bit for bit."""
    model, x = small_resnet(), torch.randn(2, 3, 32, 32)
    lean, cached = LRP(model), LRP(model)
    cached.engine.strategies.default_rule.cache_weights = True
    R_lean, R_cached = lean.attribute(x), cached.attribute(x)
    assert torch.equal(R_lean, R_cached)

    def kept(explainer: LRP) -> int:
        rule = explainer.engine.strategies.default_rule
        ops = [entry[1] for entry in explainer.engine.cache.values() if isinstance(entry, tuple)]
        return len(rule._positive_weights) + sum("positive_weight" in vars(op) for op in ops)

    assert kept(lean) == 0
    assert kept(cached) > 0


def test_each_lstm_layer_runs_once_per_explanation(monkeypatch):
    """The walk reruns an LSTM to get its gates: once per layer and direction (every layer below
    the top ran twice: once for the next layer's input, again for its own relevance)."""
    from relprop.core.ops import recurrent

    class Tagger(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = nn.LSTM(5, 6, num_layers=3, bidirectional=True, batch_first=True)
            self.fc = nn.Linear(12, 3)

        def forward(self, x):
            return self.fc(self.lstm(x)[0][:, -1])

    torch.manual_seed(0)
    explainer, x = LRP(Tagger().eval()), torch.randn(2, 7, 5)
    runs: list[tuple[int, int]] = []
    original = recurrent._run

    def counted(lstm, layer, direction, inputs):
        runs.append((layer, direction))
        return original(lstm, layer, direction, inputs)

    monkeypatch.setattr(recurrent, "_run", counted)
    R, sums = explainer.attribute(x, target=1, return_layer_sums=True)
    assert sorted(runs) == [(layer, d) for layer in range(3) for d in range(2)]
    torch.testing.assert_close(sums["input"], sums["output"], rtol=1e-4, atol=1e-6)


def test_the_held_constant_steps_are_found_once_per_plan():
    """verify and every release schedule read them: a walk of the graph each time before."""
    explainer = LRP(small_resnet())
    explainer.attribute(torch.randn(1, 3, 32, 32))
    plan = explainer.engine.plan
    assert plan.held_constant() is plan.held_constant()
    plan.refuse(plan.steps[-2], UnsupportedLayerError("refused"))  # a refusal may change them: found again
    assert plan._held_constant is None


def test_folded_weights_are_not_kept_between_calls_unless_asked():
    """A BatchNorm folded into a conv is a copy of its weights (ResNet-50: 97 MiB held for the
    explainer's life): folded per call unless `engine.cache_weights`; the same map bit for bit."""
    from relprop import get_composite
    model, x = small_resnet(), torch.randn(2, 3, 32, 32)
    lean, cached = (LRP(model, composite=get_composite("cp-lrp")) for _ in range(2))
    cached.engine.cache_weights = True
    assert torch.equal(lean.attribute(x), cached.attribute(x))
    def folded(explainer: LRP) -> list[bool]:
        """For each conv with a BatchNorm folded in: whether its folded map is cached."""
        return [step.node in explainer.engine.cache for step in explainer.engine.steps
                if step.op.name == "linear" and step.info.fold_after is not None]

    assert folded(lean) and not any(folded(lean))
    assert folded(cached) and all(folded(cached))


def test_the_audit_forward_keeps_no_attention_parts():
    """The dependency audit's second forward pass compares held-constant values only: attention
    parts kept there (every block's weights and values) only raised the first call's peak."""
    explainer = LRP(torchvision_vit(), composite=LXT_CHOICES)
    x = torch.randn(1, 3, 32, 32)
    explainer.attribute(x)
    assert explainer.engine.forward(x).values.parts
    assert not explainer.engine.forward(x, keep="constants").values.parts


class _RowCountingEpsilon(EpsilonRule):
    """The ε-rule, noting how many output rows of each dense map it runs on."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[int] = []

    def _propagate(self, op, a, R, z, w):
        self.rows.append(w.shape[0])
        return super()._propagate(op, a, R, z, w)


def test_timm_attention_keeps_its_weights_and_the_qkv_rule_runs_on_the_values_third():
    """timm's blocks call `F.scaled_dot_product_attention` on q, k, v unbound from one qkv
    projection. Under CP the call keeps the weights, V and `A·V` (not q or k), and the qkv
    projection's rule runs on the values' third alone (q and k receive nothing), with the
    relevance it gives when everything is recomputed from the recorded values."""
    rule = _RowCountingEpsilon()
    composite = Composite(rules={nn.Linear: rule, nn.Conv2d: "epsilon", nn.LayerNorm: "norm-epsilon"},
                          input_rule="epsilon", split="signed", attention="cp", constants="leak")
    model = timm_vit()
    explainer = LRP(model, composite=composite)
    x = torch.randn(1, 3, 32, 32)
    explainer.attribute(x)
    engine = explainer.engine
    record = engine.forward(x, keep="all")
    parts = [held for held in record.values.parts.values() if not isinstance(held, torch.Tensor)]  # not rstd
    assert len(parts) == len(model.blocks)
    for held in parts:
        assert not any(t.shape[-1] == 48 for t in vars(held).values() if isinstance(t, torch.Tensor)
                       and t.dim() == 3), "a merged-heads tensor kept"
        assert held.weights.shape == (1, 3, 17, 17) and held.values.shape == (1, 3, 17, 16)
    seed = torch.zeros_like(record.output)
    seed[:, 2] = record.output[:, 2]
    rule.rows.clear()
    kept = engine.backward(record, seed).input
    assert sorted(rule.rows) == sorted([10] + [48, 48, 48, 192] * len(model.blocks))  # head; qkv's third, proj, fc2, fc1
    for node in [node for node, held in record.values.parts.items() if not isinstance(held, torch.Tensor)]:
        del record.values.parts[node]  # the attention's parts (LayerNorms keep their rstd)
    recomputed = engine.backward(record, seed).input
    assert torch.equal(kept, recomputed)


class _PoolNet(nn.Module):
    """Max pools after a ReLU (with windows of zeros: the input's top half is zero and the
    conv has no bias), as a module and as a call, and one after a BatchNorm (signed)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.ReLU(), nn.MaxPool2d(3, 2, 1))
        self.conv = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.signed = nn.Sequential(nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8), nn.MaxPool2d(2))
        self.head = nn.Sequential(nn.Conv2d(8, 4, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.nn.functional.max_pool2d(torch.relu(self.conv(self.stem(x))), kernel_size=2, stride=1)
        return self.head(self.signed(x))


def _pool_input() -> torch.Tensor:
    torch.manual_seed(1)
    x = torch.randn(2, 3, 16, 16)
    x[:, :, :8] = 0
    return x


class _GeneralWinners(WinnerTakesAll):
    """Winner-takes-all by the general path (a strategy of the user's): autograd's transpose."""


def test_winner_takes_all_scatters_to_the_forward_argmax_bit_for_bit():
    """The forward keeps each 2-d pool's argmax; the walk scatters R/z to it (and a window of
    zeros to its first element, as the pooling rule's fallback does) instead of re-running the
    pool: the map and layer sums are the general path's, bit for bit, signed pools included."""
    model, x = _PoolNet().eval(), _pool_input()
    fast = LRP(model, composite=Composite(maxpool="wta"))
    general = LRP(model, composite=Composite(maxpool=_GeneralWinners()))
    ours, our_sums = fast.attribute(x, target=1, return_layer_sums=True)
    theirs, their_sums = general.attribute(x, target=1, return_layer_sums=True)
    assert torch.equal(ours, theirs)
    assert all(torch.equal(our_sums[k], their_sums[k]) for k in their_sums)
    record = fast.engine.forward(x)
    kept = {node.name for node in record.values.parts}
    assert {"stem_2", "max_pool2d", "signed_2"} <= kept  # the three pools' indices
    assert float(record.values[next(n for n in record.values.parts if n.name == "stem_2")].amin()) == 0.0
    assert not general.engine.forward(x).values.parts


class _GeneralWindows(AverageWindows):
    """The proportional strategy's general formula on every input (a window with a negative
    value to its maximum), without the shortcut for inputs >= 0."""

    def function(self, geometry, dims, where):
        def windows(t):
            minus = -t.detach()
            signed = torch.nn.functional.max_pool2d(minus, *geometry) > 0
            averaged = torch.nn.functional.avg_pool2d(t, geometry.kernel, geometry.stride, geometry.padding,
                                                      geometry.ceil_mode, True)
            return torch.where(signed, torch.nn.functional.max_pool2d(t, *geometry), averaged)

        return windows


def test_average_windows_of_a_nonnegative_input_are_the_general_formula():
    """After a ReLU no window holds a negative value: the pool's windows are averaged without
    the masks (the default composite's stem pool, 96 ms to 33 ms on ResNet-50). The map equals
    the general formula's (zeros' signs aside), signed pools included."""
    model, x = _PoolNet().eval(), _pool_input()
    ours = LRP(model, composite=Composite(maxpool="avg")).attribute(x, target=1)
    theirs = LRP(model, composite=Composite(maxpool=_GeneralWindows())).attribute(x, target=1)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


@pytest.mark.parametrize("batch,channels,size", [(1, (64, 256), 56), (2, (256, 64), 14), (3, (8, 16), 20)])
def test_a_pointwise_conv_transposes_as_one_matrix_product(batch, channels, size):
    """A 1×1 conv (stride 1, no padding) from 14×14 positions up transposes as `Wᵀ s` per
    position: conv_transpose2d's numbers to float rounding, its shape and layout."""
    from relprop.core.linear_op import as_linear_op

    torch.manual_seed(0)
    conv = nn.Conv2d(*channels, 1)
    s = torch.randn(batch, channels[1], size, size)
    shape = torch.Size((batch, channels[0], size, size))
    ours = as_linear_op(conv).transpose(s, conv.weight.detach(), shape)
    assert ours.shape == shape and ours.is_contiguous()
    torch.testing.assert_close(ours, torch.nn.functional.conv_transpose2d(s, conv.weight.detach()),
                               rtol=1e-5, atol=1e-6)


def _matrix_product_against_conv_path(monkeypatch, model: nn.Module, x: torch.Tensor, transpose: str,
                                      threshold: str, **kwargs) -> int:
    """The map with a matrix-product transpose (`linear_op.<transpose>`) against the conv path
    (its `<threshold>` set out of reach): equal to float rounding, the same total and layers.
    Returns how often the fast path ran."""
    from relprop.core import linear_op

    calls = []
    original = getattr(linear_op, transpose)

    def counted(*args):
        calls.append(1)
        return original(*args)

    monkeypatch.setattr(linear_op, transpose, counted)
    ours, our_sums = LRP(model, **kwargs).attribute(x, target=3, return_layer_sums=True)
    fast = len(calls)
    monkeypatch.setattr(linear_op, threshold, float("inf"))
    theirs, their_sums = LRP(model, **kwargs).attribute(x, target=3, return_layer_sums=True)
    assert len(calls) == fast  # the second explainer took the conv path
    scale = float(theirs.abs().max())
    torch.testing.assert_close(ours / scale, theirs / scale, rtol=0, atol=1e-5)
    assert float(ours.sum()) == pytest.approx(float(theirs.sum()), rel=1e-5)
    assert our_sums.keys() == their_sums.keys()
    return fast


def test_pointwise_transposes_change_a_resnet_map_by_rounding_only(monkeypatch):
    """ResNet-50's bottlenecks (1×1 convs at 56×56 and 28×28 here), default composite: the map
    with the matrix-product transposes is the conv path's to float rounding."""
    torch.manual_seed(0)
    model = torchvision.models.resnet50(num_classes=10).eval()
    x = torch.randn(1, 3, 112, 112)
    assert _matrix_product_against_conv_path(monkeypatch, model, x, "_pointwise_transpose",
                                             "_POINTWISE_MIN_POSITIONS") >= 10


@pytest.mark.parametrize("dims,batch,channels,kernel,positions", [
    (2, 1, (3, 64), 16, 3), (2, 2, (3, 24), 4, 5), (3, 2, (4, 8), 4, 2), (1, 3, (5, 6), 16, 4)])
def test_a_patch_embedding_transposes_as_one_matrix_product(dims, batch, channels, kernel, positions):
    """A conv whose windows tile its input (stride = kernel, no padding), windows of 16 pixels
    and more: its transpose is one GEMM and a reshuffle, conv_transpose's numbers to float
    rounding, its shape and layout."""
    from relprop.core import linear_op

    torch.manual_seed(0)
    conv = getattr(nn, f"Conv{dims}d")(*channels, kernel, stride=kernel)
    s = torch.randn(batch, channels[1], *(positions,) * dims)
    shape = torch.Size((batch, channels[0], *(positions * kernel,) * dims))
    op = linear_op.as_linear_op(conv)
    assert op._patchwise(conv.weight, s.shape, shape)
    ours = op.transpose(s, conv.weight.detach(), shape)
    theirs = getattr(torch.nn.functional, f"conv_transpose{dims}d")(s, conv.weight.detach(), stride=kernel)
    assert ours.shape == shape and ours.is_contiguous()
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_a_conv_that_does_not_tile_its_input_keeps_the_conv_path():
    """Windows that overlap, leave rows out (an input not a multiple of the stride) or are
    small (2×2 downsamplings) transpose by conv_transpose as before."""
    from relprop.core.linear_op import as_linear_op

    for conv, size in ((nn.Conv2d(3, 8, 4, stride=4), 18), (nn.Conv2d(3, 8, 4, stride=2), 16),
                       (nn.Conv2d(3, 8, 2, stride=2), 16), (nn.Conv2d(3, 8, 4, stride=4, padding=1), 16)):
        output = conv(torch.zeros(1, 3, size, size)).shape
        assert not as_linear_op(conv)._patchwise(conv.weight, output, torch.Size((1, 3, size, size)))


def test_patchwise_transposes_change_a_vit_map_by_rounding_only(monkeypatch):
    """torchvision's ViT (its 8×8 patch embedding is the input layer), LXT's choices: the map
    with the matrix-product transpose is the conv path's to float rounding."""
    model, x = torchvision_vit(), torch.randn(2, 3, 32, 32)
    assert _matrix_product_against_conv_path(monkeypatch, model, x, "_patchwise_transpose", "_PATCHWISE_MIN_AREA",
                                             composite=LXT_CHOICES) == 1


class _Reshuffles(nn.Module):
    """Every form of reshape, permute and axis swap the direct transposes take, and slices,
    which they leave to autograd."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.linear, self.head = nn.Conv2d(3, 4, 3), nn.Linear(4, 5), nn.Linear(400, 3)
        self.unflatten, self.flatten = nn.Unflatten(1, (2, 2)), nn.Flatten()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.permute(self.conv(x).permute(0, 2, 3, 1), (0, 3, 1, 2)).permute([0, 2, 3, 1])
        y = self.linear(y.relu())[..., :4]
        y = torch.transpose(y.reshape(y.shape[0], 10, 10, 4), 1, 3).flatten(2).swapaxes(1, 2)
        y = self.unflatten(y[:, :, :4].unsqueeze(1).squeeze(1).transpose(1, 2))
        return self.head(self.flatten(torch.flatten(y.view(y.shape[0], -1), 1)))


@pytest.mark.parametrize("build,shape,composite", [
    (lambda: _Reshuffles().eval(), (2, 3, 12, 12), None), (small_convnext, (2, 3, 32, 32), LXT_CHOICES),
    (small_swin, (1, 3, 40, 40), LXT_CHOICES), (timm_vit, (2, 3, 32, 32), None)])
def test_reshapes_and_permutes_move_relevance_back_as_autograd_does(build, shape, composite, monkeypatch):
    """A reshape's, a permute's and an axis swap's transpose applied directly (no graph, no
    released input materialized): the map and every layer sum are autograd's, bit for bit."""
    from relprop.core.ops import route

    torch.manual_seed(1)
    model, x = build(), torch.randn(*shape)
    kwargs = {} if composite is None else {"composite": composite}
    moved = []
    original = route._moved_back

    def counted(*args):
        result = original(*args)
        moved.append(result is not None)
        return result

    monkeypatch.setattr(route, "_moved_back", counted)
    ours, our_sums = LRP(model, **kwargs).attribute(x, target=1, return_layer_sums=True)
    assert sum(moved) >= 3 and not (shape == (2, 3, 12, 12) and all(moved))  # _Reshuffles' slices: autograd
    monkeypatch.setattr(route, "_moved_back", lambda *args: None)
    theirs, their_sums = LRP(model, **kwargs).attribute(x, target=1, return_layer_sums=True)
    assert torch.equal(ours, theirs)
    assert our_sums.keys() == their_sums.keys()
    assert all(torch.equal(our_sums[name], their_sums[name]) for name in our_sums)
