"""A checkpoint's `model_kwargs` (benchmarks/train_tin10.py --model-kwargs) rebuild the model it
was trained as: a ViT at 32 px with patch 8 does not fit timm's default 224 px / patch 16."""

from __future__ import annotations

import pytest
import torch

from relprop.errors import CheckpointError
from relprop.models import load_model

timm = pytest.importorskip("timm")
KWARGS = {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 32, "num_heads": 2}


def save(tmp_path, model, **extra):
    path = tmp_path / "vit.pt"
    torch.save({"arch": "timm/vit_tiny_patch16_224", "num_classes": 3, "input_size": 32, "resize": 32,
                "crop": None, "state_dict": model.state_dict(), **extra}, path)
    return path


def test_model_kwargs_rebuild_the_trained_model(tmp_path):
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=3, **KWARGS).eval()
    loaded, info = load_model(save(tmp_path, model, model_kwargs=KWARGS))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    assert info.extra["model_kwargs"] == KWARGS
    with pytest.raises(CheckpointError, match="do not fit"):  # without them: timm's defaults
        load_model(save(tmp_path, model))


def test_model_kwargs_that_are_no_dict_are_refused(tmp_path):
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=3, **KWARGS)
    with pytest.raises(CheckpointError, match="model_kwargs must be a dict"):
        load_model(save(tmp_path, model, model_kwargs=[1, 2]))
