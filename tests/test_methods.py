"""Baselines against independent references: pytorch-grad-cam 1.4.8, Captum, and a direct
per-channel Score-CAM loop written from the paper's definition."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from relprop.errors import InputError
from relprop.methods import BOW_METHODS, METHOD_NAMES, get_method

from sharedfiles import shared_path


class TinyNet(nn.Module):
    """A small CNN with a ResNet-style `layer4` (the CAM layer), cheap enough for loops."""

    def __init__(self, classes: int = 5, width: int = 12) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU())
        self.layer4 = nn.Sequential(nn.Sequential(nn.Conv2d(8, width, 3, stride=2, padding=1), nn.ReLU()))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, classes))

    def forward(self, x):
        return self.head(self.layer4(self.stem(x)))


@pytest.fixture(scope="module")
def tiny() -> nn.Module:
    torch.manual_seed(0)
    return TinyNet().eval()


@pytest.fixture(scope="module")
def tin10():
    from relprop.models import load_model, preprocessing

    model, info = load_model(shared_path("models", "resnet18_tin10.pt"))
    root = shared_path("data", "tin10", "val")
    from relprop.images import load_image

    files = [root / "n01882714" / "val_3202.JPEG", root / "n04146614" / "val_1815.JPEG"]
    x = torch.stack([preprocessing(info)(load_image(f)) for f in files])
    return model, x


def scorecam_loop(model: nn.Module, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Score-CAM for one image exactly as haofanwang's code: one masked forward per channel."""
    kept = {}
    handle = layer.register_forward_hook(lambda m, i, o: kept.setdefault("a", o))
    with torch.no_grad():
        cls = int(model(x).argmax(1))
        handle.remove()
        activation = kept["a"]
        total = torch.zeros(1, 1, *x.shape[-2:])
        for k in range(activation.shape[1]):
            up = F.interpolate(activation[:, k:k + 1], size=x.shape[-2:], mode="bilinear",
                               align_corners=False)
            if up.max() == up.min():
                continue
            norm = (up - up.min()) / (up.max() - up.min())
            total += torch.softmax(model(x * norm), dim=1)[0, cls] * up
        total = F.relu(total)
        return (total - total.min()) / (total.max() - total.min())


@pytest.mark.parametrize("batch_size", [1, 5, 64])
def test_scorecam_batched_equals_the_per_channel_loop(tiny, batch_size):
    torch.manual_seed(1)
    x = torch.randn(2, 3, 24, 24)
    maps = get_method("scorecam", tiny, batch_size=batch_size).attribute(x)
    assert maps.shape == (2, 1, 24, 24)
    for i in range(2):
        expected = scorecam_loop(tiny, tiny.layer4[-1], x[i:i + 1])
        torch.testing.assert_close(maps[i:i + 1], expected, atol=2e-6, rtol=1e-5)


def test_scorecam_skips_constant_channels(tiny):
    model = TinyNet()
    model.load_state_dict(tiny.state_dict())
    with torch.no_grad():  # channel 0 of layer4 becomes constant (bias only)
        model.layer4[0][0].weight[0] = 0
        model.layer4[0][0].bias[0] = 0.5
    x = torch.randn(1, 3, 24, 24)
    maps = get_method("scorecam", model.eval(), batch_size=4).attribute(x)
    torch.testing.assert_close(maps, scorecam_loop(model, model.layer4[-1], x), atol=2e-6, rtol=1e-5)


def test_gradcam_matches_pytorch_grad_cam(tin10):
    cam_module = pytest.importorskip("pytorch_grad_cam")
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    model, x = tin10
    ours = get_method("gradcam", model).attribute(x)
    preds = model(x).argmax(1)
    cam = cam_module.GradCAM(model=model, target_layers=[model.layer4[-1]])
    theirs = cam(input_tensor=x, targets=[ClassifierOutputTarget(int(p)) for p in preds])
    assert ours.shape == (2, 1, 112, 112)
    torch.testing.assert_close(ours[:, 0], torch.from_numpy(theirs), atol=1e-5, rtol=0)


def test_gradcam_explains_the_given_target(tiny):
    x = torch.randn(3, 3, 24, 24)
    method = get_method("gradcam", tiny)
    preds = tiny(x).argmax(1)
    torch.testing.assert_close(method.attribute(x), method.attribute(x, target=preds))
    other = (preds + 1) % 5
    assert not torch.allclose(method.attribute(x), method.attribute(x, target=other))


@pytest.mark.parametrize("name,captum_class,kwargs", [
    ("gradient", "Saliency", {"abs": False}),
    ("gradxinput", "InputXGradient", {}),
    ("ig", "IntegratedGradients", {}),
    ("gbp", "GuidedBackprop", {}),
])
def test_pixel_baselines_match_captum_on_the_predicted_class(tiny, name, captum_class, kwargs):
    import captum.attr

    x = torch.randn(3, 3, 24, 24)
    preds = tiny(x).argmax(1)
    expected = getattr(captum.attr, captum_class)(tiny).attribute(x.clone().requires_grad_(),
                                                                  target=preds, **kwargs)
    ours = get_method(name, tiny, batch_size=7).attribute(x)
    assert ours.shape == x.shape
    torch.testing.assert_close(ours, expected.detach(), atol=1e-5, rtol=1e-4)


def test_captum_lrp_as_the_paper_called_it(tin10):
    import captum.attr

    model, x = tin10
    preds = model(x).argmax(1)
    expected = torch.cat([captum.attr.LRP(model).attribute(x[i:i + 1].clone().requires_grad_(),
                                                           target=int(preds[i])) for i in range(2)])
    ours = torch.cat([get_method("lrp-captum", model).attribute(x[i:i + 1]) for i in range(2)])
    torch.testing.assert_close(ours, expected.detach())


def test_lrp_variants_and_heat_quantization(tin10):
    from relprop import LRP, heat_quantize

    model, x = tin10
    ours = get_method("ours", model)
    assert ours.is_lrp and ours.channels == 3
    torch.testing.assert_close(ours.attribute(x), LRP(model).attribute(x))
    noid = get_method("ours-sym-noid", model).attribute(x)
    torch.testing.assert_close(noid, LRP(model, split="symmetric", identity_skips=False).attribute(x))
    hq = get_method("ours+hq", model)
    maps = hq.attribute(x)
    assert hq.name == "ours+hq" and hq.channels == 1 and maps.shape == (2, 1, 112, 112)
    assert torch.equal(maps[:, 0], heat_quantize(LRP(model).attribute(x).sum(1)))
    assert all(len(torch.unique(m)) <= 8 for m in maps)
    # 3-channel baselines: +hq follows the chosen 2-D reduction
    gbp = get_method("gbp", model).attribute(x)
    hq0 = get_method("gbp+hq", model, channels="channel0").attribute(x)
    assert torch.equal(hq0[:, 0], heat_quantize(gbp[:, 0]))


def test_lrp_methods_report_conservation(tin10):
    model, x = tin10
    maps, sums = get_method("ours", model).attribute(x, return_layer_sums=True)
    probs = torch.softmax(model(x), 1).max(1).values
    torch.testing.assert_close(sums["output"], probs)
    torch.testing.assert_close(maps.sum((1, 2, 3)), probs, atol=1e-4, rtol=1e-4)


def test_every_registered_method_gives_input_sized_maps():
    torch.manual_seed(0)
    import torchvision

    model = torchvision.models.resnet18(num_classes=4).eval()
    x = torch.randn(2, 3, 64, 64)
    for name in METHOD_NAMES:
        if name == "scorecam":  # 512 forwards per image here; its shape is checked on TinyNet
            continue
        if name in BOW_METHODS:  # explain BoW models only: tests/test_bow.py
            continue
        method = get_method(name, model)
        maps = method.attribute(x)
        assert maps.shape == (2, method.channels, 64, 64), name
        assert torch.isfinite(maps).all(), name


def test_unknown_method_is_one_clear_error(tiny):
    with pytest.raises(InputError, match="unknown method 'gradcam\\+\\+'"):
        get_method("gradcam++", tiny)


def test_target_out_of_range_is_one_clear_error(tiny):
    from relprop.errors import TargetError

    x = torch.randn(2, 3, 24, 24)
    for name in ("gradcam", "gradient", "ig", "scorecam"):
        with pytest.raises(TargetError, match="target 7 is out of range for a model with 5 outputs"):
            get_method(name, tiny).attribute(x, target=7)


@pytest.mark.parametrize(("arch", "expected"), [
    ("vgg11", "features.20"),                 # the last max pool, before VGG's avgpool(7)
    ("mobilenet_v3_small", "features.12.2"),  # Hardswish of the last conv block
])
def test_cam_layer_is_found_on_non_resnets_and_matches_pytorch_grad_cam(arch, expected):
    """Grad-CAM on the found layer equals pytorch-grad-cam 1.4.8 on `features[-1]`, the layer
    its documentation names for VGG and MobileNet (up to its cv2 resize of a 2x2 map)."""
    import torchvision

    from relprop.methods import find_cam_layer

    cam_module = pytest.importorskip("pytorch_grad_cam")
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    torch.manual_seed(0)
    model = torchvision.models.get_model(arch, num_classes=4).eval()
    x = torch.randn(2, 3, 64, 72)
    assert find_cam_layer(model, x) == expected
    ours = get_method("gradcam", model).attribute(x)
    torch.testing.assert_close(ours, get_method("gradcam", model, layer=model.features[-1]).attribute(x),
                               atol=0, rtol=0)
    preds = model(x).argmax(1)
    theirs = cam_module.GradCAM(model=model, target_layers=[model.features[-1]])(
        input_tensor=x, targets=[ClassifierOutputTarget(int(p)) for p in preds])
    assert ours.shape == (2, 1, 64, 72)
    torch.testing.assert_close(ours[:, 0], torch.from_numpy(theirs), atol=1e-3, rtol=0)


def test_densenet_cam_is_grad_cam_of_the_pooled_feature_map():
    """DenseNet pools `relu(features)` (a functional, in-place ReLU): the found layer is
    `features.norm5` and the map is Grad-CAM of relu(norm5), written out here from the paper."""
    import torchvision

    from relprop.methods import find_cam_layer, minmax, upsample

    torch.manual_seed(0)
    model = torchvision.models.densenet121(num_classes=4).eval()
    x = torch.randn(2, 3, 64, 72)
    assert find_cam_layer(model, x) == "features.norm5"
    with torch.no_grad():
        features = F.relu(model.features(x))
    features.requires_grad_(True)
    logits = model.classifier(features.mean((2, 3)))
    (grad,) = torch.autograd.grad(logits.gather(1, logits.argmax(1, keepdim=True)).sum(), features)
    cam = F.relu((grad.mean((2, 3), keepdim=True) * features.detach()).sum(1, keepdim=True))
    expected = minmax(upsample(cam, x.shape[-2:]))
    torch.testing.assert_close(get_method("gradcam", model).attribute(x), expected, atol=1e-5, rtol=0)


def test_resnet_cam_layer_stays_the_papers(tiny):
    import torchvision

    from relprop.methods import default_cam_layer

    model = torchvision.models.resnet18(num_classes=3).eval()
    assert default_cam_layer(model, torch.randn(1, 3, 32, 32)) is model.layer4[-1]
    assert default_cam_layer(tiny, torch.randn(1, 3, 24, 24)) is tiny.layer4[-1]


def test_cam_layer_by_name_and_a_wrong_name(tiny):
    method = get_method("gradcam", tiny, layer="stem.1")
    assert method.layer is tiny.stem[1]
    with pytest.raises(InputError, match="--cam-layer 'nope'"):
        get_method("scorecam", tiny, layer="nope")


def test_requested_methods_keep_the_spelling_and_the_order_once_each():
    from relprop.methods import requested_methods

    assert requested_methods(["gradcam", " ours", "lrp-split", "ig", "ours+hq", "gradcam"]) == \
        ["gradcam", "ours", "ig", "ours+hq"]
    with pytest.raises(InputError, match="unknown method 'nope'"):
        requested_methods(["gradcam", "nope"])
    with pytest.raises(InputError, match="no method given"):
        requested_methods([" ", ""])


def test_every_method_object_is_callable_as_its_attribute():
    """`get_method(name, model)(x)` is `.attribute(x)`: the README calls methods like functions."""
    import torchvision

    from relprop.methods import method_names

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=4).eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    for name in method_names():
        if name not in BOW_METHODS:  # built on BoW models only: tests/test_bow.py
            assert callable(get_method(name, model)), name
    for name in ("lrp-split", "gradcam", "gradxinput", "lrp-contrastive"):  # one per family, cheap
        method = get_method(name, model)
        expected = method.attribute(x, target=[1, 3])
        assert torch.equal(method(x, target=[1, 3]), expected), name
        assert torch.equal(method(x, [1, 3]), expected), name
