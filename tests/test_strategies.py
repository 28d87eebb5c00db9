"""A composite's policies are strategy objects: the names are aliases of them, a user's own
strategy is used as it is, and `reference` swaps in the reference twins in one place."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import Tensor, nn

from relprop import LRP, Composite
from relprop.core.constants import KeepOnInput, LeakToConstants
from relprop.core.interpreter import RelevanceEngine
from relprop.core.ops.attention import AttnLRP, ConservativeAttention
from relprop.core.ops.maxpool import AverageWindows, ReferenceAverage2x2, WinnerTakesAll
from relprop.core.splitting import RatioSplit, ReferenceSplit, SignedSplit, SymmetricSplit
from relprop.errors import ConfigError


def _resnet() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=5).eval()


@pytest.mark.parametrize(("field", "name", "strategy"), [
    ("split", "ratio", RatioSplit()), ("split", "symmetric", SymmetricSplit()), ("split", "signed", SignedSplit()),
    ("maxpool", "avg", AverageWindows()), ("maxpool", "wta", WinnerTakesAll()),
])
def test_a_name_is_an_alias_of_its_strategy(field, name, strategy):
    model, x = _resnet(), torch.randn(2, 3, 40, 40)
    by_name = LRP(model, **{field: name}).attribute(x)
    by_object = LRP(model, **{field: strategy}).attribute(x)
    assert torch.equal(by_name, by_object)


@pytest.mark.parametrize(("field", "name", "strategy"), [
    ("attention", "cp", ConservativeAttention()), ("attention", "attnlrp", AttnLRP()),
    ("constants", "input", KeepOnInput()), ("constants", "leak", LeakToConstants()),
])
def test_attention_and_constants_names_are_aliases_too(field, name, strategy):
    """On a ViT, where attention and constants (class token, position embedding) change the map."""
    from torchvision.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(image_size=32, patch_size=16, num_layers=1, num_heads=2, hidden_dim=8,
                              mlp_dim=16, num_classes=3).eval()
    x = torch.randn(2, 3, 32, 32)
    by_name = LRP(model, **{field: name}).attribute(x)
    assert torch.equal(by_name, LRP(model, **{field: strategy}).attribute(x))
    other = {"cp": "attnlrp", "attnlrp": "cp", "input": "leak", "leak": "input"}[name]
    assert not torch.allclose(by_name, LRP(model, **{field: other}).attribute(x))  # the choice matters here


class AllDownTheResidualBranch:
    """A user's split: an identity skip gets nothing (what `identity_skips=False` does)."""

    def __call__(self, R: Tensor, a: Tensor, b: Tensor, skip: int | None) -> tuple[Tensor, Tensor]:
        if skip is None:
            return RatioSplit()(R, a, b, skip)
        zero = torch.zeros_like(R)
        return (zero, R) if skip == 0 else (R, zero)


def test_a_users_split_strategy_is_used_as_it_is():
    model, x = _resnet(), torch.randn(2, 3, 40, 40)
    mine = LRP(model, split=AllDownTheResidualBranch()).attribute(x)
    ablation = LRP(model, split="ratio", identity_skips=False).attribute(x)
    torch.testing.assert_close(mine, ablation, rtol=0, atol=0)
    assert not torch.equal(mine, LRP(model).attribute(x))  # and it differs from the default


def test_reference_swaps_in_the_reference_twins():
    model = _resnet()
    plain = RelevanceEngine(model, composite=Composite(split="symmetric", maxpool="wta")).strategies
    reference = RelevanceEngine(model, composite=Composite(split="symmetric", maxpool="wta", reference=True)).strategies
    assert isinstance(plain.split, SymmetricSplit) and isinstance(plain.maxpool, WinnerTakesAll)
    assert reference.split == ReferenceSplit(symmetric=True) and isinstance(reference.maxpool, ReferenceAverage2x2)


def test_an_unknown_name_is_one_line_listing_the_names():
    with pytest.raises(ConfigError, match=r"^unknown split 'halves'; choose one of: ratio, symmetric, signed$"):
        LRP(_resnet(), split="halves")
