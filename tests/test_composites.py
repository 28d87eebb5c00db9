"""Composites as objects, the named-composite registry, and the methods registry's names."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

import relprop
from relprop import LRP, Composite, RelevanceEngine, composite_names, get_composite
from relprop.errors import InputError, TargetError
from relprop.methods import ALIASES, METHOD_NAMES, canonical_name, get_method, method_names

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


@pytest.fixture(scope="module")
def bn_resnet() -> nn.Module:
    """A ResNet of one BasicBlock per stage, random weights, non-trivial BatchNorm statistics
    (positive scales)."""
    from torchvision.models.resnet import BasicBlock, ResNet

    torch.manual_seed(0)
    model = ResNet(BasicBlock, [1, 1, 1, 1], num_classes=5)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.normal_(0, 0.1)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.normal_(0, 0.1)
    return model.eval()


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def _ratios(model, composite, x):
    R, sums = LRP(model, composite=composite).attribute(x, return_layer_sums=True)
    return R, {key: total / sums["output"] for key, total in sums.items()}


TRANSFORMER = ("cp-lrp", "attnlrp")  # LXT's choices; tests/test_transformers.py compares them with LXT
EXACT = ("lrp-split", "lrp-split-sym", "lrp-split-noid", "lrp-split-sym-noid", "lrp-plain", "alpha2beta1")


def test_the_registry_holds_the_documented_composites():
    assert set(composite_names()) == {*EXACT, "lrp-split-ref", "epsilon-plus-flat", "epsilon-gamma-box",
                                      *TRANSFORMER}


@pytest.mark.parametrize("name", composite_names())
def test_every_registered_composite_conserves_or_leaks_as_documented(name, bn_resnet, x):
    """docs/rules.md: z+, w⁺, flat, the splits and αβ conserve; ε leaks at the dense layer only;
    the reference numerics leak a few percent at the input; γ with folded BN leaks in the blocks."""
    R, ratio = _ratios(bn_resnet, get_composite(name, mean=MEAN, std=STD), x)
    assert torch.isfinite(R).all()
    one = torch.ones(2)
    if name in EXACT:
        torch.testing.assert_close(ratio["input"], one, rtol=1e-4, atol=1e-4)
    elif name == "lrp-split-ref":
        torch.testing.assert_close(ratio["layer1.0"], one, rtol=1e-4, atol=1e-4)
        assert ((ratio["input"] > 0.8) & (ratio["input"] < 0.999)).all()
    elif name in TRANSFORMER:  # ε everywhere, BN folded, signed split: gradient × input (Ancona et al.)
        from references import explained_logit_seed, gradient_times_input

        with torch.no_grad():
            seed = explained_logit_seed(bn_resnet(x))
        logit_seeded = LRP(bn_resnet, composite=get_composite(name)).attribute(x, target=seed)
        reference = gradient_times_input(bn_resnet, x)
        for ours, theirs in zip(logit_seeded, reference, strict=True):
            assert float(torch.corrcoef(torch.stack([ours.flatten(), theirs.flatten()]))[0, 1]) >= 0.9999
        torch.testing.assert_close(logit_seeded.sum((1, 2, 3)), reference.sum((1, 2, 3)), rtol=1e-3, atol=1e-4)
    elif name == "epsilon-plus-flat":  # ε at fc: the rest conserves what reaches fc
        assert ((ratio["fc"] - 1).abs() > 1e-4).all() and ((ratio["fc"] - 1).abs() < 0.25).all()
        torch.testing.assert_close(ratio["input"], ratio["fc"], rtol=1e-4, atol=1e-4)
    else:  # epsilon-gamma-box: same ε at fc as EpsilonPlusFlat, then bounded leaks in the blocks
        _, flat = _ratios(bn_resnet, get_composite("epsilon-plus-flat"), x)
        torch.testing.assert_close(ratio["fc"], flat["fc"])
        assert not torch.allclose(ratio["input"], ratio["fc"], rtol=1e-3)
        assert ((R.abs().sum((1, 2, 3)) / R.sum((1, 2, 3)).abs()) < 2).all()
    if name == "alpha2beta1":  # conserves the total, with positive and negative parts
        assert ((R.abs().sum((1, 2, 3)) / R.sum((1, 2, 3)).abs()) > 1.0001).all()


@pytest.mark.parametrize(("name", "kwargs"), [
    ("lrp-split", {}),
    ("lrp-split-sym-noid", {"split": "symmetric", "identity_skips": False}),
    ("lrp-split-ref", {"preset": "reference"}),
    ("lrp-plain", {"split": "signed"}),
    ("epsilon-plus-flat", {"split": "signed", "maxpool": "wta", "input_rule": "flat",
                           "rules": {nn.Conv2d: "zplus", nn.Linear: "epsilon"}}),
    ("epsilon-gamma-box", {"split": "signed", "maxpool": "wta", "input_rule": "zb", "mean": MEAN, "std": STD,
                           "rules": {nn.Conv2d: "gamma", nn.Linear: "epsilon"}}),
])
def test_keyword_shortcut_equals_the_composite_object(name, kwargs, bn_resnet, x):
    """The keywords of docs/rules.md and tests/test_batchnorm.py build the registered composite."""
    by_object = LRP(bn_resnet, composite=get_composite(name, mean=MEAN, std=STD)).attribute(x)
    by_keywords = LRP(bn_resnet, **kwargs).attribute(x)
    assert torch.equal(by_object, by_keywords)


def test_engine_takes_a_composite_like_its_keywords(bn_resnet, x):
    composite = Composite(split="symmetric", rules={nn.Linear: "epsilon"})
    seed = torch.zeros(2, 5)
    seed[:, 3] = 1.0
    maps = []
    for engine in (RelevanceEngine(bn_resnet, composite=composite),
                   RelevanceEngine(bn_resnet, split="symmetric", rules={nn.Linear: "epsilon"})):
        maps.append(engine.backward(engine.forward(x), seed).input)
    assert engine.composite == composite and engine.bn == "fold"
    assert torch.equal(maps[0], maps[1])


def test_giving_a_composite_and_its_keywords_is_an_error(bn_resnet):
    from ssd_helpers import tiny_ssd

    from relprop.detection.crp import CRP

    composite = get_composite("lrp-split")
    for build in (lambda: LRP(bn_resnet, composite=composite, split="symmetric"),
                  lambda: LRP(bn_resnet, composite=composite, preset="reference"),
                  lambda: RelevanceEngine(bn_resnet, composite=composite, rules={nn.Linear: "epsilon"}),
                  lambda: CRP(tiny_ssd(), composite=composite, identity_skips=False)):
        with pytest.raises(ValueError, match="either composite= or its keyword arguments"):
            build()


def test_crp_takes_a_composite_like_its_keywords():
    from ssd_helpers import random_images, tiny_ssd

    from relprop.detection.crp import CRP

    model, images = tiny_ssd(num_classes=5), random_images(1)
    by_keywords = CRP(model, split="symmetric").attribute(images)
    by_object = CRP(model, composite=Composite(split="symmetric", input_rule="zb")).attribute(images)
    default = CRP(model).attribute(images)
    assert torch.equal(by_object, by_keywords)
    assert not torch.equal(by_object, default)  # the split reached the backbone


def test_composite_is_frozen_validated_and_hashable_by_value():
    composite = get_composite("lrp-split-sym")
    with pytest.raises(dataclasses.FrozenInstanceError):
        composite.split = "ratio"
    assert composite.replace(split="ratio") == get_composite("lrp-split") != composite
    with pytest.raises(ValueError, match="unknown split 'half'"):
        Composite(split="half")
    with pytest.raises(ValueError, match="unknown maxpool rule"):
        Composite(maxpool="max")
    with pytest.raises(ValueError, match="reference preset passes BatchNorm through"):
        Composite(reference=True, bn="fold")
    with pytest.raises(InputError, match="zB rule") as info:
        get_composite("epsilon-gamma-box")
    assert "\n" not in str(info.value)
    with pytest.raises(InputError, match="unknown composite 'zennit'; known: lrp-split, "):
        get_composite("zennit")
    assert relprop.Composite is Composite and relprop.get_composite is get_composite


def test_paper_names_are_aliases_of_descriptive_names():
    assert ALIASES == {"ours": "lrp-split", "ours-sym": "lrp-split-sym", "ours-noid": "lrp-split-noid",
                       "ours-sym-noid": "lrp-split-sym-noid", "ours-ref": "lrp-split-ref"}
    for alias, canonical in ALIASES.items():
        assert canonical_name(alias) == canonical == canonical_name(canonical)
        assert canonical_name(alias + "+hq") == canonical + "+hq"
        assert canonical in method_names() and alias not in method_names()
        assert alias in method_names(include_aliases=True) and alias in METHOD_NAMES
    assert canonical_name("gradcam") == "gradcam" and "lrp-plain" in method_names()


@pytest.mark.parametrize("alias", sorted(ALIASES))
def test_alias_and_canonical_name_give_identical_maps(alias, bn_resnet, x):
    ours = get_method(alias, bn_resnet, mean=MEAN, std=STD)
    named = get_method(ALIASES[alias], bn_resnet, mean=MEAN, std=STD)
    assert ours.name == alias and named.name == ALIASES[alias] and ours.is_lrp
    assert torch.equal(ours.attribute(x), named.attribute(x))


def test_ours_is_the_default_lrp_and_hq_works_through_the_alias(bn_resnet, x):
    default = LRP(bn_resnet).attribute(x)
    assert torch.equal(get_method("ours", bn_resnet).attribute(x), default)
    assert torch.equal(get_method("ours+hq", bn_resnet).attribute(x),
                       get_method("lrp-split+hq", bn_resnet).attribute(x))


def test_lrp_method_keywords_change_the_composite(bn_resnet, x):
    sym = get_method("lrp-split", bn_resnet, split="symmetric").attribute(x)
    assert torch.equal(sym, get_method("lrp-split-sym", bn_resnet).attribute(x))
    with pytest.raises(InputError, match="takes no options"):
        get_method("gradcam", bn_resnet, split="symmetric")


def test_unknown_method_is_one_line_listing_every_name(bn_resnet):
    with pytest.raises(InputError) as info:
        get_method("lrp-spilt", bn_resnet)
    message = str(info.value)
    assert "\n" not in message and message.startswith("unknown method 'lrp-spilt'")
    for name in method_names(include_aliases=True):
        assert name in message


def test_methods_and_lrp_refuse_a_bad_target_with_the_same_line(bn_resnet, x):
    """One target resolver: the baselines used to say 'target has 3 entries for 2 inputs'."""
    for name in ("lrp-split", "gradient", "gradcam"):
        method = get_method(name, bn_resnet)
        with pytest.raises(TargetError, match="^got 3 targets for 2 inputs$"):
            method.attribute(x, target=[0, 1, 2])
        with pytest.raises(TargetError, match="target 5 is out of range for a model with 5 outputs"):
            method.attribute(x, target=5)
        with pytest.raises(TargetError, match="class index"):
            method.attribute(x, target=True)


def test_adding_a_composite_and_a_method_is_one_registration_each(monkeypatch, bn_resnet, x):
    """The worked extension example: a composite is one `register_composite` line; a method is
    one class and one `register` line; both are then reachable by name like the built-in ones."""
    import doctest

    from relprop.core import composites
    from relprop.methods import Method, registry
    from relprop.methods.lrp import composite_method

    monkeypatch.setattr(composites, "_REGISTRY", dict(composites._REGISTRY))
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    composites.register_composite("eps-everywhere", lambda mean, std: Composite(
        rules={nn.Conv2d: "epsilon", nn.Linear: "epsilon"}, split="signed"))
    assert composite_names()[-1] == "eps-everywhere"

    class Ones(Method):
        channels = 1

        def attribute(self, inputs, target=None):
            return torch.ones(inputs.shape[0], 1, *inputs.shape[2:])

    registry.register("ones", lambda model, name, options: Ones(model, name))
    registry.register("lrp-eps", composite_method("eps-everywhere"), takes_lrp_options=True)
    assert get_method("ones+hq", bn_resnet).attribute(x).shape == (2, 1, 32, 32)
    ours = get_method("lrp-eps", bn_resnet).attribute(x)
    assert torch.equal(ours, LRP(bn_resnet, split="signed",
                                 rules={nn.Conv2d: "epsilon", nn.Linear: "epsilon"}).attribute(x))
    with pytest.raises(ValueError, match="already registered"):
        registry.register("ours", lambda model, name, options: Ones(model, name))
    assert doctest.testmod(composites).failed == 0  # the module's own example


def test_preset_keyword_of_an_lrp_method_is_the_reference_composite(bn_resnet, x):
    ref = get_method("lrp-split-ref", bn_resnet).attribute(x)
    assert torch.equal(get_method("lrp-split", bn_resnet, preset="reference").attribute(x), ref)
    assert torch.equal(LRP(bn_resnet, composite=get_composite("lrp-split-ref")).attribute(x), ref)
    with pytest.raises(ValueError, match="unknown preset 'paper'"):
        get_method("lrp-split", bn_resnet, preset="paper")


def test_transformer_composites_are_methods_listed_in_help_and_docs(capsys):
    """`cp-lrp` and `attnlrp` by name: a method of the registry, in `relprop explain --help` and
    `evaluate --help`, and in docs/rules.md's generated table (tests/test_docs_examples.py checks that
    every generated block matches the registry)."""
    import sys
    from pathlib import Path

    from relprop.cli.main import main

    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root / "tools"))
    try:
        import make_docs
    finally:
        sys.path.remove(str(root / "tools"))
    for command in ("explain", "evaluate"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        help_text = capsys.readouterr().out
        assert all(name in help_text.split() or f"{name}," in help_text.split() for name in TRANSFORMER), command
    docs = (root / "docs" / "rules.md").read_text()
    block = make_docs.composite_table_block()
    assert block in docs, "run: python tools/make_docs.py"
    for name in TRANSFORMER:
        assert name in method_names() and f"| `{name}` | `{name}` |" in block
