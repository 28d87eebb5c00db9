"""The baselines (Grad-CAM, Score-CAM, gradients, guided backprop, IG) on the 13 modern networks of
issue #12, random weights at 64 px: the CAM layer each one gets, how channels-last maps and token
sequences become B×C×h×w maps (checked against the image geometry and by hand), and the methods'
outputs (finite, right shape, and a property of each method)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from relprop.errors import InputError
from relprop.methods import find_cam_layer, get_method, minmax, upsample
from relprop.methods.cams import MapLayout, map_layout

timm = pytest.importorskip("timm")

SIZE = 64


def _tiny_vit() -> nn.Module:
    """torchvision's VisionTransformer (vit_b_16's class) with small dims; its head starts at
    zero (torchvision's init), which would make every gradient zero: re-drawn here."""
    model = torchvision.models.VisionTransformer(image_size=SIZE, patch_size=16, num_layers=2,
                                                 num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=10)
    nn.init.normal_(model.heads.head.weight, std=0.1)
    return model


def _tiny_swin() -> nn.Module:
    """torchvision's SwinTransformer (swin_t's class, channels-last stages) with small dims
    (embed_dim 24, not 16: a 16×16×16 map would be N×C×h×w and N×h×w×C alike)."""
    return torchvision.models.SwinTransformer(patch_size=[4, 4], embed_dim=24, depths=[1, 1, 1, 1],
                                              num_heads=[2, 2, 2, 2], window_size=[4, 4], num_classes=10)


def _tv(name: str):
    return lambda: torchvision.models.get_model(name, weights=None, num_classes=10)


def _timm(name: str, **kwargs):
    return lambda: timm.create_model(name, pretrained=False, num_classes=10, **kwargs)


# name -> (builder, the CAM layer find_cam_layer must pick, has nn.ReLU modules)
MODELS = {
    "mobilenet_v3_small": (_tv("mobilenet_v3_small"), "features.12.2", True),
    "efficientnet_b0": (_tv("efficientnet_b0"), "features.8.2", False),
    "convnext_tiny": (_tv("convnext_tiny"), "features.7.2", False),
    "shufflenet_v2_x0_5": (_tv("shufflenet_v2_x0_5"), "conv5.2", True),
    "swin_t": (_tiny_swin, "permute", False),
    "vit_b_16": (_tiny_vit, "encoder.layers.encoder_layer_1.ln_1", False),
    "regnet_y_400mf": (_tv("regnet_y_400mf"), "trunk_output.block4.block4-5.activation", True),
    "timm/convnext_atto": (_timm("convnext_atto"), "stages.3.blocks.1", False),
    "timm/vit_tiny_patch16_224": (_timm("vit_tiny_patch16_224", img_size=SIZE, depth=2),
                                  "blocks.1.norm1", False),
    "timm/deit_tiny_patch16_224": (_timm("deit_tiny_patch16_224", img_size=SIZE, depth=2),
                                   "blocks.1.norm1", False),
    "timm/efficientnet_b0": (_timm("efficientnet_b0"), "bn2.act", False),
    "timm/resnetv2_50": (_timm("resnetv2_50"), "norm.act", True),
    "timm/regnety_008": (_timm("regnety_008"), "s4.b2.act3", True),
}
HEAVY = {"convnext_tiny", "shufflenet_v2_x0_5", "efficientnet_b0", "timm/efficientnet_b0", "timm/resnetv2_50",
         "mobilenet_v3_small", "regnet_y_400mf", "timm/regnety_008"}

def _slow_on_heavy(names):
    return [pytest.param(n, marks=pytest.mark.slow) if n in HEAVY else n for n in names]


_built: dict[str, nn.Module] = {}


def model_of(name: str) -> nn.Module:
    """The network with seeded weights; biases (zero at init in most of them) drawn too, as after
    training: with a bias-free conv before a LayerNorm the output would not change along the ray
    α·x but jump at α ≈ 0, where no integration rule sees it."""
    if name not in _built:
        torch.manual_seed(0)
        model = MODELS[name][0]().eval()
        with torch.no_grad():
            for module in model.modules():
                if isinstance(getattr(module, "bias", None), nn.Parameter):
                    module.bias.add_(0.1 * torch.randn_like(module.bias))
        _built[name] = model
    return _built[name]


def image(n: int = 1) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(n, 3, SIZE, SIZE)


# ------------------------------------------------------------------ layouts, by hand


def test_token_layout_drops_prefix_tokens_and_lays_patches_row_major():
    """Token p + i*w + j is the patch in row i, column j; prefix tokens are dropped."""
    b, prefix, h, w, c = 2, 2, 3, 4, 5
    tokens = torch.randn(b, prefix + h * w, c)
    layout = map_layout(tokens.shape, (3 * 16, 4 * 16), prefix)
    assert layout == MapLayout("tokens", (h, w), prefix)
    grid = layout.to_nchw(tokens)
    for i in range(h):
        for j in range(w):
            torch.testing.assert_close(grid[:, :, i, j], tokens[:, prefix + i * w + j, :], rtol=0, atol=0)


def test_layouts_of_shapes():
    assert map_layout((1, 768, 2, 2), (64, 64)) == MapLayout("nchw", (2, 2))
    assert map_layout((1, 2, 3, 768), (64, 96)) == MapLayout("nhwc", (2, 3))
    assert map_layout((1, 17, 192), (64, 64)) == MapLayout("tokens", (4, 4), 1)  # fewest prefix
    assert map_layout((1, 18, 192), (64, 64), prefix=2) == MapLayout("tokens", (4, 4), 2)
    assert map_layout((1, 3, 17, 17), (64, 64)) is None  # attention scores: no map
    assert map_layout((1, 768, 1, 1), (64, 64)) is None  # a pooled vector, for the layer search
    assert map_layout((1, 768, 1, 1), (32, 32), min_cells=1) == MapLayout("nchw", (1, 1))
    assert map_layout((1, 768), (64, 64)) is None


@pytest.mark.parametrize(("name", "layer"), [
    ("vit_b_16", "encoder.layers.encoder_layer_0.ln_1"),
    ("timm/vit_tiny_patch16_224", "blocks.0.norm1"),
    ("timm/deit_distilled", "blocks.0.norm1"),  # class and distillation tokens
    ("swin_t", "features.0"),                    # channels-last patch embedding
])
def test_layout_puts_each_patch_where_it_is_in_the_image(name, layer):
    """Change the pixels of one 16×16 patch: before any attention, only that patch's cell changes
    in the map that the CAM methods read (image geometry, not the layout code, says where)."""
    if name == "timm/deit_distilled":
        torch.manual_seed(0)
        model = timm.create_model("deit_tiny_distilled_patch16_224", num_classes=10, img_size=SIZE,
                                  depth=1).eval()
    else:
        model = model_of(name)
    module = model.get_submodule(layer)
    method = get_method("gradcam", model, layer=module)
    outputs = []
    handle = module.register_forward_hook(lambda m, a, o: outputs.append(o.detach()))
    x = image()
    changed = x.clone()
    changed[:, :, 16:32, 32:48] += 1.0  # patch row 1, column 2 of the 4×4 grid (16 px patches)
    with torch.no_grad():
        model(x), model(changed)
    handle.remove()
    maps = [method.feature_map(o, x) for o in outputs]
    cell_size = SIZE // maps[0].shape[-1]
    diff = (maps[1] - maps[0]).abs().sum(1)[0]
    expected = torch.zeros_like(diff, dtype=torch.bool)
    expected[16 // cell_size:32 // cell_size, 32 // cell_size:48 // cell_size] = True
    assert bool((diff[expected] > 0).all()) and float(diff[~expected].abs().max()) < 1e-5


def test_gradcam_of_a_one_cell_layer_is_accepted():
    """ResNet-18 at 32 px: the paper's layer4[-1] is 1×1, a degenerate map but no refusal (the
    layer search passes such maps over; a layer it is given is used)."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=2).eval()
    cam = get_method("gradcam", model).attribute(torch.randn(2, 3, 32, 32))
    assert cam.shape == (2, 1, 32, 32) and bool(torch.isfinite(cam).all())
    assert float(cam.min()) >= 0 and float(cam.max()) <= 1


class _PlantedTokens(nn.Module):
    """Patch tokens after `prefix` learned tokens; the logits read one token only."""

    def __init__(self, prefix: int, token: int) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, 6, 16, 16)
        self.prefix_tokens = nn.Parameter(torch.randn(1, prefix, 6))
        self.norm = nn.LayerNorm(6)
        self.head = nn.Linear(6, 3)
        self.num_prefix_tokens, self.token = prefix, token

    def forward(self, x):
        tokens = self.embed(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.prefix_tokens.expand(len(x), -1, -1), tokens], 1)
        return self.head(self.norm(tokens)[:, self.token])


def test_gradcam_of_tokens_equals_the_hand_computation_with_a_planted_gradient():
    """Only token k reaches the logits, so the gradient at the tokens is planted there; the map is
    written out here with loops over the grid (no layout code)."""
    torch.manual_seed(0)
    prefix, (h, w) = 2, (4, 4)
    model = _PlantedTokens(prefix, token=prefix + 1 * w + 2).eval()
    x = image(2)
    assert find_cam_layer(model, x) == "norm"
    with torch.no_grad():
        tokens = model.norm(torch.cat([model.prefix_tokens.expand(2, -1, -1),
                                       model.embed(x).flatten(2).transpose(1, 2)], 1))
        target = model.head(tokens[:, model.token]).argmax(1)
    weights = model.head.weight[target] / (h * w)  # the planted gradient, averaged over the grid
    cam = torch.zeros(2, 1, h, w)
    for i in range(h):
        for j in range(w):
            cam[:, 0, i, j] = (weights * tokens[:, prefix + i * w + j]).sum(1)
    expected = minmax(upsample(F.relu(cam), (SIZE, SIZE)))
    torch.testing.assert_close(get_method("gradcam", model).attribute(x), expected, atol=1e-5, rtol=0)


class _Masked(nn.Module):
    """A network that sees only the top-left quarter of the image."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x):
        mask = torch.zeros_like(x)
        mask[:, :, :SIZE // 2, :SIZE // 2] = 1
        return self.net(x * mask)


def test_gradcam_concentrates_where_the_class_score_comes_from():
    """Bias-free conv net on a masked image: the map is zero wherever the conv's receptive field
    misses the visible quarter, and carries its mass inside it."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.ReLU(),
                        nn.Conv2d(8, 8, 3, stride=2, padding=1, bias=False), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))
    model = _Masked(net).eval()
    cam = get_method("gradcam", model).attribute(image(2))[:, 0]
    assert float(cam[:, SIZE // 2 + 4:, :].abs().max()) == 0.0
    assert float(cam[:, :, SIZE // 2 + 4:].abs().max()) == 0.0
    assert bool((cam[:, :SIZE // 2, :SIZE // 2].sum((1, 2)) > 0.9 * cam.sum((1, 2))).all())


# ------------------------------------------------------------------ the 13 networks


@pytest.mark.parametrize("name", list(MODELS))
def test_cam_layer_found(name):
    """CNNs: the last feature map (the innermost module that returns it); Swin: its NCHW permute
    before pooling; ViTs that pool the class token: the last block's norm1, the last tokens
    whose patch tokens still reach the class token."""
    assert find_cam_layer(model_of(name), image()) == MODELS[name][1]


@pytest.mark.parametrize("name", _slow_on_heavy(MODELS))
def test_gradcam_and_gradients(name):
    model, x = model_of(name), image(1)
    cam = get_method("gradcam", model).attribute(x)
    assert cam.shape == (1, 1, SIZE, SIZE) and bool(torch.isfinite(cam).all())
    assert float(cam.min()) >= 0 and float(cam.max()) in (0.0, 1.0)  # 0: ReLU of a negative sum
    # the gradient is the logit's derivative (float64, where a central difference is exact enough)
    model64, x64 = copy.deepcopy(model).double(), x.double()
    grad = get_method("gradient", model64).attribute(x64)
    assert grad.shape == x.shape and bool(torch.isfinite(grad).all()) and float(grad.abs().sum()) > 0
    k = int(model64(x64).argmax())
    step = 1e-4 * grad / grad.norm()
    with torch.no_grad():
        rise = float(model64(x64 + step)[0, k] - model64(x64 - step)[0, k])
    assert rise == pytest.approx(2e-4 * float(grad.norm()), rel=1e-3)
    torch.testing.assert_close(get_method("gradxinput", model64).attribute(x64), grad * x64)


@pytest.mark.parametrize("name", _slow_on_heavy(MODELS))
def test_guided_backprop_runs_on_relu_nets_and_is_refused_without_relu(name):
    model, x = model_of(name), image(1)
    if not MODELS[name][2]:
        with pytest.raises(InputError, match="gbp: guided backprop changes the backward pass of "
                                             r"nn.ReLU modules only.*use the method 'gradient'") as error:
            get_method("gbp", model)
        assert "\n" not in str(error.value)
        return
    maps = get_method("gbp", model).attribute(x)
    assert maps.shape == x.shape and bool(torch.isfinite(maps).all())
    plain = get_method("gradient", model).attribute(x)
    assert float((maps - plain).norm()) > 0.01 * float(plain.norm())  # guided is not the gradient


@pytest.mark.parametrize("name", _slow_on_heavy(MODELS))
def test_integrated_gradients_completeness(name):
    """IG sums to f(x) - f(0) (completeness), up to Captum's 50-step Gauss-Legendre rule."""
    model, x = model_of(name), image(1)
    maps = get_method("ig", model).attribute(x)
    assert maps.shape == x.shape and bool(torch.isfinite(maps).all())
    with torch.no_grad():
        logits, base = model(x), model(torch.zeros_like(x))
    k = int(logits.argmax())
    difference = float(logits[0, k] - base[0, k])
    assert abs(float(maps.sum()) - difference) <= 0.05 * abs(difference) + 1e-3


@pytest.mark.parametrize("name", _slow_on_heavy(MODELS))
def test_scorecam(name):
    """Score-CAM on the found layer: a map in [0, 1] peaking at 1, or all zeros when no channel
    raises the class (the ReLU of the weighted sum); hq of it has 8 levels at most."""
    model, x = model_of(name), image(1)
    maps = get_method("scorecam", model, batch_size=64).attribute(x)
    assert maps.shape == (1, 1, SIZE, SIZE) and bool(torch.isfinite(maps).all())
    assert float(maps.min()) >= 0 and float(maps.max()) in (0.0, 1.0)
