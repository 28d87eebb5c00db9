"""Hugging Face `transformers` image classifiers (the optional `hf` extra): built from tiny configs,
explained on the capture path with conservation and the fidelity check; `hf/<folder>` loads a saved
model offline (safetensors only) with its image processor's preprocessing, for `relprop explain`
and `relprop evaluate`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from relprop import LRP
from relprop.cli.main import main
from relprop.errors import CheckpointError
from relprop.huggingface import processor_preprocessing
from relprop.modelinfo import Preprocessing
from relprop.models import load_model, preprocessing

transformers = pytest.importorskip("transformers")

VIT = dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
           intermediate_size=64)
SWIN = dict(image_size=32, patch_size=2, embed_dim=16, depths=[1, 1], num_heads=[2, 2], window_size=4)
CONVNEXT = dict(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2)
CONFIGS = {
    "vit": VIT,
    # transformers 5 maps deit to two classes and picks by `architectures`
    "deit": dict(VIT, architectures=["DeiTForImageClassification"]),
    "beit": dict(VIT, use_mean_pooling=True, use_relative_position_bias=True),
    "dinov2": VIT,
    "swin": SWIN,
    "swinv2": SWIN,
    "convnext": CONVNEXT,
    "convnextv2": CONVNEXT,
}


def build(model_type: str, **extra) -> nn.Module:
    torch.manual_seed(0)
    config = transformers.AutoConfig.for_model(model_type, num_labels=5, **CONFIGS[model_type], **extra)
    model = transformers.AutoModelForImageClassification.from_config(config).eval()
    with torch.no_grad():  # layer scales (1e-6 in ConvNeXt) and GRN (zeros) redrawn to realistic values
        for name, parameter in model.named_parameters():
            if any(key in name for key in ("layer_scale", "lambda", "grn")):
                parameter.uniform_(0.3, 1.0)
    return model


@pytest.mark.parametrize("model_type", list(CONFIGS))
def test_classifier_is_explained_on_the_capture_path(model_type):
    model = build(model_type)
    x = torch.randn(2, 3, 32, 32)
    explainer = LRP(model)
    R, sums = explainer.attribute(x, return_layer_sums=True)  # the fidelity check runs here
    probability = torch.softmax(model(x).logits, 1).max(1).values
    assert explainer.capture_path == "concrete"  # every one of them defeats symbolic tracing
    assert R.shape == x.shape
    torch.testing.assert_close(sums["output"], probability)
    torch.testing.assert_close(sums["input"], probability, rtol=2e-4, atol=0)


@pytest.mark.parametrize("model_type", ["vit", "swin"])
def test_sdpa_and_eager_attention_give_the_same_relevance(model_type):
    """transformers' two attention implementations reach relprop as different nodes (one
    scaled_dot_product_attention call; softmax between two matmuls): the same map from both
    (measured: 6e-10 against maps of 1e-3; float32 rounding)."""
    x = torch.randn(2, 3, 32, 32)
    fused = LRP(build(model_type, attn_implementation="sdpa")).attribute(x)
    eager = LRP(build(model_type, attn_implementation="eager")).attribute(x)
    torch.testing.assert_close(fused, eager, rtol=0, atol=1e-5 * float(fused.abs().max()))


@pytest.fixture(scope="module")
def saved_vit(tmp_path_factory):
    """A tiny ViT with class names and its image processor, saved as `save_pretrained` does."""
    folder = tmp_path_factory.mktemp("tiny-vit")
    names = ["cat", "dog", "fish", "owl", "ant"]
    model = build("vit", id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)})
    model.save_pretrained(folder)
    transformers.ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.4, 0.5, 0.6],
                                   image_std=[0.2, 0.25, 0.3]).save_pretrained(folder)
    return folder, model


def test_saved_folder_loads_offline_with_its_preprocessing(saved_vit, monkeypatch):
    folder, original = saved_vit
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, info = load_model(arch=f"hf/{folder}")
    assert info.preprocessing == Preprocessing((32, 32), None, (0.4, 0.5, 0.6), (0.2, 0.25, 0.3), "bilinear")
    assert info.class_names == ["cat", "dog", "fish", "owl", "ant"] and info.num_classes == 5
    assert info.source.path == str(folder / "model.safetensors")
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(model(x), original(x).logits)  # the pipelines' classifier: logits
    R = LRP(model).attribute(x)
    torch.testing.assert_close(R, LRP(original).attribute(x))


def test_pickled_weights_are_refused(tmp_path, monkeypatch):
    """Only safetensors: a pytorch_model.bin is a pickle that could run code."""
    model = build("vit")
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError) as caught:
        load_model(arch=f"hf/{tmp_path}")
    assert str(caught.value).startswith(f"hf/{tmp_path}: cannot load") and "\n" not in str(caught.value)


@pytest.mark.parametrize("name, options", [
    ("ViTImageProcessor", dict(size={"height": 32, "width": 32})),
    ("ConvNextImageProcessor", dict(size={"shortest_edge": 32}, crop_pct=0.875)),  # resize 36, crop 32
    ("BitImageProcessor", dict(size={"shortest_edge": 36}, crop_size={"height": 32, "width": 32})),
    ("DeiTImageProcessor", dict(size={"height": 36, "width": 36}, crop_size={"height": 32, "width": 32})),
])
def test_preprocessing_gives_what_the_image_processor_gives(name, options):
    """The processor's own output is the reference (measured: 2e-5 to 1.2e-4 mean difference from
    resampling; a wrong crop, size or normalization is 0.1 or more)."""
    processor = getattr(transformers, name)(**options)
    rng = np.random.default_rng(0)
    image = Image.fromarray((rng.random((25, 35, 3)) * 255).astype("uint8")).resize((70, 50), Image.BICUBIC)
    ours = preprocessing(processor_preprocessing(processor))(image)
    theirs = processor(image, return_tensors="pt").pixel_values[0]
    assert ours.shape == theirs.shape
    assert float((ours - theirs).abs().mean()) < 1e-3


def test_explain_and_evaluate_take_a_saved_folder(saved_vit, tmp_path, monkeypatch, capsys):
    folder, _ = saved_vit
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rng = np.random.default_rng(0)
    for index, label in enumerate(["cat", "dog"]):
        (tmp_path / "data" / label).mkdir(parents=True)
        Image.fromarray((rng.random((40, 48, 3)) * 255).astype("uint8")).save(tmp_path / "data" / label / f"{index}.png")
    image = tmp_path / "data" / "cat" / "0.png"
    assert main(["explain", "--arch", f"hf/{folder}", str(image), "--methods", "lrp-split",
                 "--device", "cpu", "--out", str(tmp_path / "explained")]) == 0
    err = capsys.readouterr().err
    assert "model: Hugging Face hf/" in err and "captured it per input shape" in err
    row = json.loads((tmp_path / "explained" / "predictions.jsonl").read_text())
    assert row["pred_name"] in ["cat", "dog", "fish", "owl", "ant"]
    assert (tmp_path / "explained" / "0" / "lrp-split.npy").is_file()
    assert main(["evaluate", "--arch", f"hf/{folder}", "--data", str(tmp_path / "data"), "--methods", "lrp-split",
                 "--step", "200", "--device", "cpu", "--out", str(tmp_path / "evaluated")]) == 0
    rows = [json.loads(line) for line in (tmp_path / "evaluated" / "results.jsonl").read_text().splitlines()]
    assert sorted(row["label"] for row in rows) == [0, 1]  # the folders are the model's class names
