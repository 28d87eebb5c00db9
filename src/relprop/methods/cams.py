"""Class activation maps: Grad-CAM and Score-CAM as the paper ran them, and where their layer is
(`layer4[-1]` of a ResNet, else the last spatial feature map before global pooling)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from relprop.errors import InputError
from relprop.methods.base import Method
from relprop.methods.registry import register
from relprop.targets import resolve_target


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


register("gradcam", lambda model, name, options: GradCAM(model, name, options.layer))
register("scorecam", lambda model, name, options: ScoreCAM(model, name, options.layer, options.batch_size))
