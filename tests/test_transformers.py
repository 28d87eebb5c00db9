"""Transformers in the LRP core: attention (scaled_dot_product_attention, explicit softmax(QKᵀ)V,
nn.MultiheadAttention, Swin's window attention), the class token, the two splits, and LXT.
Small models with seeded random weights; every reported cut must carry the probability."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from relprop import LRP, Composite
from relprop.core.ops.attention import AttentionCore
from relprop.core.ops.matmul import bilinear_relevance
from relprop.core.ops.softmax import softmax_relevance
from relprop.errors import UnsupportedLayerError

timm = pytest.importorskip("timm")


def timm_vit(fused: bool = True) -> nn.Module:
    torch.manual_seed(0)
    model = timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=10)
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = fused
    return model.eval()


def torchvision_vit() -> nn.Module:
    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=3,
                                                 hidden_dim=48, mlp_dim=96, num_classes=10)
    nn.init.normal_(model.heads.head.weight, std=0.2)  # torchvision starts it at zero
    return model.eval()


def small_swin() -> nn.Module:
    torch.manual_seed(0)
    from torchvision.models.swin_transformer import SwinTransformer
    model = SwinTransformer(patch_size=[4, 4], embed_dim=24, depths=[2, 2], num_heads=[2, 2], window_size=[4, 4],
                            stochastic_depth_prob=0.2, num_classes=10)
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.1)
    return model.eval()


def assert_conserves(model: nn.Module, x: torch.Tensor, **options) -> torch.Tensor:
    R, sums = LRP(model, **options).attribute(x, return_layer_sums=True)
    with torch.no_grad():
        probability = torch.softmax(model(x), 1).max(1).values
    assert torch.isfinite(R).all()
    for cut, total in sums.items():
        torch.testing.assert_close(total, probability, rtol=1e-4, atol=1e-6, msg=lambda m, c=cut: f"{c}: {m}")
    return R


@pytest.mark.parametrize("build", [lambda: timm_vit(True), lambda: timm_vit(False), torchvision_vit],
                         ids=["timm-sdpa", "timm-explicit", "torchvision-mha"])
def test_vit_conserves_with_the_defaults(build):
    assert_conserves(build(), torch.randn(2, 3, 32, 32))


def test_swin_conserves_with_shift_padding_and_patch_merging():
    """40 px: 10x10 tokens padded to windows of 4, shifted windows, patch merging, stochastic depth."""
    assert_conserves(small_swin(), torch.randn(1, 3, 40, 40))


def test_signed_split_is_selectable_and_conserves_too():
    model, x = timm_vit(), torch.randn(2, 3, 32, 32)
    ratio = assert_conserves(model, x)
    signed = assert_conserves(model, x, split="signed")
    assert not torch.allclose(ratio, signed)


@pytest.mark.parametrize("attention", ["cp", "attnlrp"])
def test_fused_and_explicit_attention_give_the_same_relevance(attention):
    """sdpa is decomposed inside the engine into the same parts as timm's explicit form."""
    x = torch.randn(2, 3, 32, 32)
    fused = LRP(timm_vit(True), attention=attention, split="signed").attribute(x)
    explicit = LRP(timm_vit(False), attention=attention, split="signed").attribute(x)
    torch.testing.assert_close(fused, explicit, rtol=1e-3, atol=1e-6)


class _Attend(nn.Module):
    """One head of attention with a mask, written with sdpa or by hand."""

    def __init__(self, fused: bool, mask: torch.Tensor | None, causal: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.qkv, self.out, self.fused, self.causal = nn.Linear(6, 18), nn.Linear(6, 3), fused, causal
        self.register_buffer("mask", mask)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        if self.fused:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask, is_causal=self.causal)
        else:
            scores = (q * 6 ** -0.5) @ k.transpose(-2, -1)
            if self.causal:
                scores = scores.masked_fill(torch.ones(5, 5, dtype=torch.bool).triu(1), float("-inf"))
            elif self.mask is not None and self.mask.dtype == torch.bool:
                scores = scores.masked_fill(~self.mask, float("-inf"))
            elif self.mask is not None:
                scores = scores + self.mask
            y = scores.softmax(dim=-1) @ v
        return self.out(y).mean(1)


@pytest.mark.parametrize("mask,causal", [(None, False), (None, True), ("bool", False), ("float", False)])
def test_sdpa_with_masks_matches_the_explicit_form(mask, causal):
    torch.manual_seed(1)
    if mask == "bool":
        mask = torch.rand(5, 5) > 0.3
        mask.fill_diagonal_(True)
    elif mask == "float":
        mask = torch.randn(5, 5)
    x = torch.randn(2, 5, 6)
    for attention in ("cp", "attnlrp"):
        options = dict(attention=attention, rules={nn.Linear: "epsilon"}, split="signed")
        fused = LRP(_Attend(True, mask, causal), **options).attribute(x)
        explicit = LRP(_Attend(False, mask, causal), **options).attribute(x)
        torch.testing.assert_close(fused, explicit, rtol=1e-4, atol=1e-6)


def test_softmax_rule_and_uniform_bilinear_rule_by_hand():
    x = torch.tensor([[1.0, 2.0, 0.5]])
    s = torch.softmax(x, -1)
    R = torch.tensor([[0.2, 0.5, 0.3]])
    expected = torch.stack([x[0, i] * (R[0, i] - s[0, i] * 1.0) for i in range(3)])[None]
    torch.testing.assert_close(softmax_relevance(x, s, R, -1), expected)
    # a 1x2 @ 2x1 product: z = a0 b0 + a1 b1, each term's share half to each factor
    a, b = torch.tensor([[2.0, 3.0]]), torch.tensor([[1.0], [-1.0]])
    R_a, R_b = bilinear_relevance(torch.matmul, a, b, torch.tensor([[4.0]]))
    z = 2.0 - 3.0
    torch.testing.assert_close(R_a, torch.tensor([[0.5 * 4 * 2 / z, 0.5 * 4 * -3 / z]]), rtol=1e-5, atol=0)
    torch.testing.assert_close(R_b, torch.tensor([[0.5 * 4 * 2 / z], [0.5 * 4 * -3 / z]]), rtol=1e-5, atol=0)


def test_cp_attention_holds_the_weights_constant():
    """CP: all relevance of A·V goes to V by the ε-rule, exactly conserved; q, k get nothing."""
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 1, 4, 5).unbind(0)
    core = AttentionCore(0.5)
    R = torch.randn(1, 4, 5)
    R_q, R_k, R_v = core.relevance(q, k, v, R, "cp")
    assert float(R_q.abs().sum()) == 0 and float(R_k.abs().sum()) == 0
    torch.testing.assert_close(R_v.sum(), R.sum(), rtol=1e-4, atol=1e-5)


def test_softmax_at_the_output_is_still_refused():
    model = nn.Sequential(nn.Linear(4, 3), nn.Softmax(dim=1))
    with pytest.raises(UnsupportedLayerError, match="applies softmax"):
        LRP(model)


def test_multihead_attention_variants_it_does_not_reproduce_are_refused():
    class WithBiasKV(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(6, 2, add_bias_kv=True, batch_first=True)

        def forward(self, x):
            return self.attn(x, x, x, need_weights=False)[0].mean(1)

    with pytest.raises(UnsupportedLayerError, match="add_bias_kv=False"):
        LRP(WithBiasKV())


def test_class_token_leak_is_reported_with_the_leak_policy():
    """constants='leak': the class token and position embedding keep their share, so the input
    gets less than the probability; the default ('input') conserves (tested above)."""
    model, x = timm_vit(), torch.randn(2, 3, 32, 32)
    R, sums = LRP(model, constants="leak").attribute(x, return_layer_sums=True)
    assert bool((R.sum((1, 2, 3)) < 0.9 * sums["output"]).all())


LXT_SCRIPT = textwrap.dedent('''
    import importlib.util, sys, types
    import torch, lxt
    # lxt 2.1's lxt.efficient imports its BERT patches, which need transformers < 5: load only
    # its torchvision-ViT patch map (lxt/efficient/models/vit_torch.py) and apply it.
    stub = types.ModuleType("lxt.efficient.models")
    stub.get_default_map = None
    sys.modules["lxt.efficient.models"] = stub
    from lxt.efficient.core import monkey_patch
    spec = importlib.util.spec_from_file_location("lxt_vit", lxt.__path__[0] + "/efficient/models/vit_torch.py")
    vit = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(vit)
    monkey_patch(vit.vision_transformer, vit.cp_LRP)
    sys.path.insert(0, sys.argv[3])
    from test_transformers import torchvision_vit
    model = torchvision_vit()
    x = torch.load(sys.argv[1]).requires_grad_(True)
    y = model(x)
    target = y.argmax(1, keepdim=True)
    logit = y.gather(1, target)[:, 0]
    probability = torch.softmax(y, 1).gather(1, target)[:, 0]
    (logit * (probability / logit).detach()).sum().backward()  # seed: the probability
    torch.save((x * x.grad).detach(), sys.argv[2])
''')


# LXT's choices spelled out (docs/rules.md "Against LXT"); the registered `cp-lrp` is this on a ViT
LXT_CHOICES = Composite(rules={nn.Linear: "epsilon", nn.Conv2d: "epsilon", nn.LayerNorm: "norm-epsilon"},
                        input_rule="epsilon", split="signed", attention="cp", constants="leak")


@pytest.mark.skipif(importlib.util.find_spec("lxt") is None, reason="lxt not installed: pip install --no-deps 'lxt>=2.1' (as .ci/run does)")
def test_agrees_with_lxt_on_a_small_vit(tmp_path):
    """LXT's own ViT patches (CP-LRP in attention, identity on GELU, LayerNorm with the std held
    constant, Gradient×Input elsewhere = ε with ε→0, signed adds, constants leak), run in a
    subprocess because LXT patches torch classes globally. relprop's registered `cp-lrp` method,
    by name, gives the same map."""
    from relprop.methods import get_method

    torch.manual_seed(1)
    x = torch.randn(4, 3, 32, 32)
    torch.save(x, tmp_path / "x.pt")
    tests = str(__import__("pathlib").Path(__file__).parent)
    subprocess.run([sys.executable, "-c", LXT_SCRIPT, str(tmp_path / "x.pt"), str(tmp_path / "r.pt"), tests],
                   check=True, capture_output=True)
    R_lxt = torch.load(tmp_path / "r.pt", weights_only=True)
    R = get_method("cp-lrp", torchvision_vit()).attribute(x)
    for ours, theirs in zip(R, R_lxt, strict=True):
        r = torch.corrcoef(torch.stack([ours.flatten(), theirs.flatten()]))[0, 1]
        assert float(r) >= 0.9999
        torch.testing.assert_close(ours.sum(), theirs.sum(), rtol=1e-3, atol=1e-5)


def test_registered_transformer_composites_are_lxts_choices_spelled_out():
    """`cp-lrp` is LXT_CHOICES on a ViT (its CNN-part settings, BatchNorm folding and
    winner-takes-all max pooling, do not apply there); `attnlrp` is the same with AttnLRP's
    attention rules, identical to that composite spelled out."""
    from relprop import get_composite

    model, x = torchvision_vit(), torch.randn(2, 3, 32, 32)
    cp = LRP(model, composite=get_composite("cp-lrp")).attribute(x)
    assert torch.equal(cp, LRP(model, composite=LXT_CHOICES).attribute(x))
    attn = LRP(model, composite=get_composite("attnlrp")).attribute(x)
    assert torch.equal(attn, LRP(model, composite=LXT_CHOICES.replace(attention="attnlrp")).attribute(x))
    assert not torch.allclose(attn, cp, rtol=1e-3)
    assert get_composite("attnlrp") == get_composite("cp-lrp").replace(attention="attnlrp")


def test_attnlrp_rules_run_on_vit():
    composite = Composite(rules={nn.Linear: "epsilon", nn.Conv2d: "epsilon"}, input_rule="epsilon", split="signed",
                          attention="attnlrp")
    R = LRP(timm_vit(), composite=composite).attribute(torch.randn(1, 3, 32, 32))
    assert torch.isfinite(R).all() and float(R.abs().sum()) > 0


@pytest.mark.slow
@pytest.mark.parametrize("name", ["swin_t", "vit_b_16", "timm:vit_tiny_patch16_224", "timm:deit_tiny_patch16_224"])
def test_issue_transformers_conserve_with_the_defaults(name):
    """The four transformers of issue #12 at 64 px (fidelity check on the first call)."""
    torch.manual_seed(0)
    if name.startswith("timm:"):
        model = timm.create_model(name[5:], pretrained=False, num_classes=10, img_size=64)
    else:
        model = torchvision.models.get_model(name, weights=None, num_classes=10,
                                             **({"image_size": 64} if name == "vit_b_16" else {}))
    assert_conserves(model.eval(), torch.randn(1, 3, 64, 64))


@pytest.mark.skipif(importlib.util.find_spec("lxt") is None, reason="lxt not installed: pip install --no-deps 'lxt>=2.1' (as .ci/run does)")
@pytest.mark.parametrize("with_bias", [False, True])
def test_attnlrp_attention_matches_lxt_explicit_rules(with_bias):
    """AttnLRP inside attention against LXT's explicit relevance functions (softmax's Taylor rule,
    matmul's ε + uniform rule), whose backward passes carry relevance, not gradients. A constant
    bias added to the scores leaves all relevance on the scores in both."""
    import lxt.explicit.functional as lf

    torch.manual_seed(0)
    q, k, v = torch.randn(3, 2, 3, 5, 4).unbind(0)
    bias = torch.randn(5, 5) if with_bias else None
    R = torch.randn(2, 3, 5, 4)
    scale = 0.5
    # LXT's matmul divides by 2z + 1e-8·sign: the same as ε = 0.5e-8 on z
    R_q, R_k, R_v = AttentionCore(scale, bias, epsilon=0.5e-8).relevance(q, k, v, R, "attnlrp")
    qs, k_, v_ = (q * scale).requires_grad_(True), k.clone().requires_grad_(True), v.clone().requires_grad_(True)
    scores = lf.matmul(qs, k_.transpose(-1, -2))
    if bias is not None:
        scores = scores + bias
    lf.matmul(lf.softmax(scores, -1), v_).backward(R)
    for ours, theirs in ((R_q, qs.grad), (R_k, k_.grad), (R_v, v_.grad)):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


def test_layernorm_rule_covers_functional_layer_norm_in_timm_subclass():
    """timm's LayerNorm calls F.layer_norm in its own forward; a rule for nn.LayerNorm reaches it
    and gives what it gives on torch's nn.LayerNorm with the same parameters."""
    torch.manual_seed(0)
    torch_norm = nn.LayerNorm(6)
    nn.init.normal_(torch_norm.weight)
    nn.init.normal_(torch_norm.bias)
    timm_norm = timm.layers.LayerNorm(6)
    timm_norm.load_state_dict(torch_norm.state_dict())
    first, last = nn.Linear(4, 6), nn.Linear(6, 3)
    x = torch.randn(2, 4)
    maps = [LRP(nn.Sequential(first, norm, last), rules={nn.LayerNorm: "norm-epsilon"}).attribute(x)
            for norm in (torch_norm, timm_norm)]
    torch.testing.assert_close(maps[0], maps[1])
    assert not torch.allclose(maps[0], LRP(nn.Sequential(first, torch_norm, last)).attribute(x))


class _MHA(nn.Module):
    """nn.MultiheadAttention (sequence-first) with a float mask and a key padding mask, or the
    same computation written out with its parameters."""

    def __init__(self, explicit: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.attn, self.explicit = nn.MultiheadAttention(6, 2), explicit
        self.register_buffer("mask", torch.randn(4, 4))
        padding = torch.zeros(2, 4)
        padding[0, 2] = float("-inf")  # float, like the mask (torch deprecates mixing the two kinds)
        self.register_buffer("padding", padding)

    def forward(self, x):  # x: (batch, tokens, 6)
        x = x.transpose(0, 1)
        if not self.explicit:
            return self.attn(x, x, x, attn_mask=self.mask, key_padding_mask=self.padding, need_weights=False)[0].mean(0)
        w, b = self.attn.in_proj_weight, self.attn.in_proj_bias
        q, k, v = (F.linear(x, w[i * 6:(i + 1) * 6], b[i * 6:(i + 1) * 6]).permute(1, 0, 2).reshape(2, 4, 2, 3)
                   .transpose(1, 2) for i in range(3))
        bias = self.mask + self.padding[:, None, None, :]
        y = (((q * 3 ** -0.5) @ k.transpose(-2, -1) + bias).softmax(dim=-1) @ v).transpose(1, 2).reshape(2, 4, 6)
        return F.linear(y, self.attn.out_proj.weight, self.attn.out_proj.bias).mean(1)


@pytest.mark.parametrize("attention", ["cp", "attnlrp"])
def test_multihead_attention_leaf_equals_its_computation_written_out(attention):
    x = torch.randn(2, 4, 6)
    options = dict(attention=attention, rules={nn.Linear: "epsilon"})
    leaf = LRP(_MHA(False), **options).attribute(x)
    explicit = LRP(_MHA(True), **options).attribute(x)
    torch.testing.assert_close(leaf, explicit, rtol=1e-4, atol=1e-6)


def test_masked_fill_with_another_value_is_refused():
    """Filling with a non-zero constant would drop the relevance of those elements silently."""
    class Fill(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(x.masked_fill(x > 1, 3.0))

    with pytest.raises(UnsupportedLayerError, match="masked_fill"):
        LRP(Fill())
