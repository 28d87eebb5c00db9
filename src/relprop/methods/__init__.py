"""Every explanation method behind one Captum-style call, run the way the paper ran it.

    method = get_method("scorecam", model)
    maps = method.attribute(x)            # (N,1,H,W) for CAMs, (N,3,H,W) for pixel methods

Every method explains the **predicted** class unless `target` (class indices) is given. A name with
the suffix `+hq` is that method followed by 8-level Heat Quantization of its 2-D map (N,1,H,W).
relprop's own LRP maps (`ours*`, `lrp-plain`) are 2-D by channel sum, the paper's heatmap; other
3-channel maps become 2-D by `channels` (`sum`, or `channel0`: the reference code's quirk).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from relprop.errors import InputError, TargetError
from relprop.evaluation.metrics import Channels, to_2d

HQ_SUFFIX = "+hq"
# relprop LRP variants: the paper's method, its ablations, the authors' numerics, plain LRP.
LRP_VARIANTS: dict[str, dict[str, Any]] = {
    "ours": {"split": "ratio", "identity_skips": True},
    "ours-sym": {"split": "symmetric", "identity_skips": True},
    "ours-noid": {"split": "ratio", "identity_skips": False},
    "ours-sym-noid": {"split": "symmetric", "identity_skips": False},
    "ours-ref": {"preset": "reference"},
    "lrp-plain": {"split": "signed"},
}
# Methods of bag-of-words kernel classifiers (relprop.bow; models from `relprop fit-bow`).
BOW_METHODS = ("bow-lrp", "bow-occlusion")
METHOD_NAMES = (*LRP_VARIANTS, "gradcam", "scorecam", "ig", "gbp", "lrp-captum", "gradient", "gradxinput",
                *BOW_METHODS)


# Older or paper-style names of registered methods (filled by the registry; see canonical_name).
ALIASES: dict[str, str] = {}


def canonical_name(name: str) -> str:
    """The registry's name for a method name or alias, `+hq` kept (`ours+hq` -> `lrp-split+hq`
    once the registry names them so); results written under an alias stay readable through it."""
    base, hq = (name[: -len(HQ_SUFFIX)], HQ_SUFFIX) if name.endswith(HQ_SUFFIX) else (name, "")
    return ALIASES.get(base, base) + hq


def method_names(*, include_aliases: bool = False) -> tuple[str, ...]:
    """Every registered method name (what --help, the docs and error messages list)."""
    return (*METHOD_NAMES, *ALIASES) if include_aliases else METHOD_NAMES


def resolve_target(model: nn.Module, inputs: Tensor, target: Tensor | int | Sequence[int] | None,
                   logits: Tensor | None = None) -> Tensor:
    """Class index per sample: the prediction when `target` is None."""
    n = inputs.shape[0]
    if logits is None:
        with torch.no_grad():
            logits = model(inputs)
    if target is None:
        return logits.argmax(dim=1)
    classes = torch.as_tensor(target, device=inputs.device).long().reshape(-1)
    if classes.numel() == 1:
        classes = classes.expand(n)
    if classes.numel() != n:
        raise TargetError(f"target has {classes.numel()} entries for {n} inputs")
    outside = (classes < 0) | (classes >= logits.shape[1])
    if bool(outside.any()):
        raise TargetError(f"target {int(classes[outside][0])} is out of range for a model with "
                          f"{logits.shape[1]} outputs")
    return classes


def minmax(maps: Tensor) -> Tensor:
    """Per-map min-max to [0, 1]; a constant map becomes zeros (instead of 0/0)."""
    flat = maps.flatten(1)
    low, high = flat.min(dim=1, keepdim=True).values, flat.max(dim=1, keepdim=True).values
    span = high - low
    scaled = torch.where(span > 0, (flat - low) / span.clamp(min=torch.finfo(maps.dtype).tiny), 0.0)
    return scaled.view_as(maps)


def last_block(model: nn.Module) -> nn.Module:
    """The last residual block of the last stage (`layer4[-1]` of torchvision's ResNets)."""
    stage = getattr(model, "layer4", None)
    if isinstance(stage, nn.Sequential) and len(stage) > 0:
        return stage[-1]
    raise InputError(f"{type(model).__name__} has no layer4: pass layer=<module> to the CAM method")


_RESHAPING_POOLS = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)  # VGG's avgpool(7): not a feature


def cam_layer_by_name(model: nn.Module, name: str) -> nn.Module:
    """`--cam-layer NAME`: a qualified module name such as `features.29` or `layer4.1`."""
    try:
        return model.get_submodule(name)
    except AttributeError:
        names = [n for n, _ in model.named_modules() if n][-4:]
        raise InputError(f"--cam-layer {name!r}: {type(model).__name__} has no such module "
                         f"(names look like {', '.join(names)})") from None


def find_cam_layer(model: nn.Module, inputs: Tensor) -> str:
    """Name of the module giving the last spatial feature map before global pooling.

    Traced with torch.fx and run once on `inputs[:1]` for shapes: the last node whose output is
    (N, C, H, W) with H*W > 1, passing over adaptive pooling (which only resizes, as VGG's
    `avgpool`) and back over functional steps to the module that made the map (DenseNet's
    `F.relu(features)` -> `features.norm5`). ResNets keep `layer4[-1]`, as the paper ran them.
    """
    from torch.fx.passes.shape_prop import ShapeProp

    from relprop.core.graph import trace
    from relprop.errors import RelpropError

    try:
        graph = trace(model)
        module = torch.fx.GraphModule(model, graph)
        with torch.no_grad():
            ShapeProp(module).propagate(inputs[:1])
    except (RelpropError, RuntimeError, TypeError, ValueError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise InputError(f"cannot find the CAM layer of {type(model).__name__} automatically "
                         f"({first}); name one with --cam-layer") from None
    modules = dict(model.named_modules())
    for node in reversed(list(graph.nodes)):
        if not _spatial(node) or (node.op == "call_module" and
                                  isinstance(modules.get(str(node.target)), _RESHAPING_POOLS)):
            continue
        while node.op != "call_module":
            parents = [p for p in node.all_input_nodes if _shape(p) == _shape(node)]
            if not parents:
                break
            node = parents[0]
        if node.op == "call_module":
            return str(node.target)
    raise InputError(f"{type(model).__name__} has no spatial feature map for a CAM; name a layer "
                     "with --cam-layer")


def _shape(node: torch.fx.Node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta")
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _spatial(node: torch.fx.Node) -> bool:
    shape = _shape(node)
    return shape is not None and len(shape) == 4 and shape[2] * shape[3] > 1


def default_cam_layer(model: nn.Module, inputs: Tensor) -> nn.Module:
    """`layer4[-1]` of a ResNet (the paper's choice), else the found layer (`find_cam_layer`)."""
    if isinstance(getattr(model, "layer4", None), nn.Sequential) and len(model.layer4) > 0:
        return last_block(model)
    return model.get_submodule(find_cam_layer(model, inputs))


class Method:
    """Base class: `name`, `is_lrp` (relprop LRP, with conservation sums), `channels` (3 or 1)."""

    is_lrp = False
    channels = 3

    def __init__(self, model: nn.Module, name: str) -> None:
        self.model = model
        self.name = name

    def attribute(self, inputs: Tensor, target: Tensor | int | Sequence[int] | None = None) -> Tensor:
        raise NotImplementedError

    def to_2d(self, maps: Tensor, channels: Channels = "sum") -> Tensor:
        """(N,H,W) map as ranked by the metrics: LRP heatmaps are channel sums by definition."""
        return to_2d(maps, "sum" if self.is_lrp else channels)


class Gradient(Method):
    """Gradient of the target logit w.r.t. the input (signed), optionally times the input."""

    def __init__(self, model: nn.Module, name: str = "gradient", times_input: bool = False) -> None:
        super().__init__(model, name)
        self.times_input = times_input

    def attribute(self, inputs, target=None):
        x = inputs.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            logits = self.model(x)
            classes = resolve_target(self.model, x, target, logits)
            (grad,) = torch.autograd.grad(logits.gather(1, classes[:, None]).sum(), x)
        return (grad * x.detach() if self.times_input else grad).detach()


class _LayerHook:
    """Keeps the output of one module during a forward."""

    def __init__(self, layer: nn.Module) -> None:
        self.layer, self.output = layer, None

    def __enter__(self) -> _LayerHook:
        self.handle = self.layer.register_forward_hook(self._keep)
        return self

    def _keep(self, module, args, output) -> None:
        self.output = output

    def __exit__(self, *exc) -> None:
        self.handle.remove()


class CAMMethod(Method):
    """A method on one layer's activations: given (a module or its name), or found on first use."""

    channels = 1

    def __init__(self, model: nn.Module, name: str, layer: nn.Module | str | None = None) -> None:
        super().__init__(model, name)
        self.layer = cam_layer_by_name(model, layer) if isinstance(layer, str) else layer

    def cam_layer(self, inputs: Tensor) -> nn.Module:
        if self.layer is None:
            self.layer = default_cam_layer(self.model, inputs)
        return self.layer


class GradCAM(CAMMethod):
    """Grad-CAM (pytorch-grad-cam 1.4.8 as the paper ran it): channel weights = mean gradient of
    the target logit, ReLU of the weighted activation sum, bilinear upsampling, min-max."""

    def __init__(self, model: nn.Module, name: str = "gradcam", layer: nn.Module | str | None = None) -> None:
        super().__init__(model, name, layer)

    def attribute(self, inputs, target=None):
        x = inputs.detach().clone().requires_grad_(True)
        with torch.enable_grad(), _LayerHook(self.cam_layer(inputs)) as hook:
            logits = self.model(x)
            classes = resolve_target(self.model, x, target, logits)
            activation = hook.output
            (grad,) = torch.autograd.grad(logits.gather(1, classes[:, None]).sum(), activation)
        weights = grad.mean(dim=(2, 3), keepdim=True)
        cam = F.relu((weights * activation.detach()).sum(dim=1, keepdim=True))
        return minmax(upsample(cam, x.shape[-2:]))


def upsample(maps: Tensor, size: Sequence[int]) -> Tensor:
    """The one upsampling convention of all CAM methods: bilinear, half-pixel centres."""
    return F.interpolate(maps, size=tuple(size), mode="bilinear", align_corners=False)


class ScoreCAM(CAMMethod):
    """Score-CAM as the paper ran it (haofanwang's code), with the masked inputs batched.

    For each channel k of the last stage: upsample bilinearly, skip if constant, min-max, multiply
    the normalized input, weight w_k = softmax probability of the class. Map =
    min-max(ReLU(sum_k w_k * upsampled raw activation_k)). `batch_size` masked inputs per forward
    bound the memory at any number of channels.
    """

    def __init__(self, model: nn.Module, name: str = "scorecam", layer: nn.Module | str | None = None,
                 batch_size: int = 32) -> None:
        super().__init__(model, name, layer)
        self.batch_size = int(batch_size)

    @torch.no_grad()
    def attribute(self, inputs, target=None):
        with _LayerHook(self.cam_layer(inputs)) as hook:
            logits = self.model(inputs)
        classes = resolve_target(self.model, inputs, target, logits)
        activations = hook.output
        maps = [self._one(inputs[n:n + 1], activations[n], int(classes[n])) for n in range(len(inputs))]
        return torch.cat(maps)

    def _one(self, x: Tensor, activation: Tensor, cls: int) -> Tensor:
        size = x.shape[-2:]
        total = torch.zeros((1, 1, *size), dtype=x.dtype, device=x.device)
        for start in range(0, activation.shape[0], self.batch_size):
            raw = upsample(activation[start:start + self.batch_size, None], size)
            low = raw.amin(dim=(1, 2, 3), keepdim=True)
            high = raw.amax(dim=(1, 2, 3), keepdim=True)
            keep = (high > low).flatten()
            if not keep.any():
                continue
            raw, low, high = raw[keep], low[keep], high[keep]
            probs = torch.softmax(self.model(x * ((raw - low) / (high - low))), dim=1)[:, cls]
            total += (probs.view(-1, 1, 1, 1) * raw).sum(dim=0, keepdim=True)
        return minmax(F.relu(total))


class CaptumMethod(Method):
    """A Captum attribution class called with its defaults, as the paper's baselines were."""

    def __init__(self, model: nn.Module, name: str, factory: Callable[[nn.Module], Any],
                 **kwargs: Any) -> None:
        super().__init__(model, name)
        self.factory, self.kwargs = factory, kwargs

    def attribute(self, inputs, target=None):
        classes = resolve_target(self.model, inputs, target)
        x = inputs.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            maps = self.factory(self.model).attribute(x, target=classes, **self.kwargs)
        return maps.detach()


class LRPMethod(Method):
    """relprop's LRP (the core's `relprop.LRP`) in one of its variants."""

    is_lrp = True

    def __init__(self, model: nn.Module, name: str, **lrp_kwargs: Any) -> None:
        from relprop import LRP

        super().__init__(model, name)
        self.lrp = LRP(model, **lrp_kwargs)

    def attribute(self, inputs, target=None, return_layer_sums: bool = False):
        """The core takes None, class indices or an (N, num_outputs) seed as `target`."""
        return self.lrp.attribute(inputs, target=target, return_layer_sums=return_layer_sums)


class HeatQuantized(Method):
    """A method followed by 8-level Heat Quantization of its 2-D map (N,1,H,W)."""

    channels = 1

    def __init__(self, base: Method, channels: Channels = "sum", levels: int = 8) -> None:
        super().__init__(base.model, base.name + HQ_SUFFIX)
        self.base, self.reduction, self.levels = base, channels, levels
        self.is_lrp = base.is_lrp

    def attribute(self, inputs, target=None, **kwargs):
        result = self.base.attribute(inputs, target, **kwargs)
        if isinstance(result, tuple):
            return (self.quantize(result[0]), *result[1:])
        return self.quantize(result)

    def quantize(self, base_maps: Tensor) -> Tensor:
        """HQ of maps the base method already made (lets a caller reuse one base map)."""
        from relprop import heat_quantize

        return heat_quantize(self.base.to_2d(base_maps, self.reduction), levels=self.levels)[:, None]


def get_method(name: str, model: nn.Module, *, layer: nn.Module | str | None = None, batch_size: int = 32,
               channels: Channels = "sum", mean: Sequence[float] | None = None,
               std: Sequence[float] | None = None, **lrp_options: Any) -> Method:
    """Build a method by its registry name (see METHOD_NAMES; any name may end in `+hq`).

    `layer`: CAM layer, a module or its qualified name (default `layer4[-1]` of a ResNet, else
    the last spatial feature map before global pooling, see `find_cam_layer`); `batch_size`: Score-CAM masked inputs and Integrated
    Gradients' internal batch per forward; `channels`: 2-D reduction before `+hq`; `mean`/`std` and
    other keywords go to `relprop.LRP`.
    """
    if name.endswith(HQ_SUFFIX):
        base = get_method(name[: -len(HQ_SUFFIX)], model, layer=layer, batch_size=batch_size,
                          channels=channels, mean=mean, std=std, **lrp_options)
        return HeatQuantized(base, channels)
    if name in BOW_METHODS or getattr(model, "is_bow", False):  # BoW models: relprop.bow
        from relprop.bow.explainer import get_bow_method

        return get_bow_method(name, model)
    if name in LRP_VARIANTS:
        return LRPMethod(model, name, **LRP_VARIANTS[name], mean=mean, std=std, **lrp_options)
    if lrp_options:
        raise InputError(f"method {name!r} takes no options {sorted(lrp_options)}")
    return _baseline(name, model, layer, batch_size)


def _baseline(name: str, model: nn.Module, layer: nn.Module | str | None, batch_size: int) -> Method:
    import captum.attr as ca

    if name == "gradcam":
        return GradCAM(model, name, layer)
    if name == "scorecam":
        return ScoreCAM(model, name, layer, batch_size)
    if name == "gradient":
        return Gradient(model, name)
    if name == "gradxinput":
        return Gradient(model, name, times_input=True)
    if name == "ig":
        return CaptumMethod(model, name, ca.IntegratedGradients, internal_batch_size=max(batch_size, 50))
    if name == "gbp":
        return CaptumMethod(model, name, ca.GuidedBackprop)
    if name == "lrp-captum":
        return CaptumMethod(model, name, ca.LRP)
    known = ", ".join(METHOD_NAMES)
    raise InputError(f"unknown method {name!r}; known: {known} (each also with the suffix {HQ_SUFFIX})")
