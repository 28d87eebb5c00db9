"""Class activation maps: Grad-CAM and Score-CAM as the paper ran them, and where their layer is
(`layer4[-1]` of a ResNet, else the last feature map the top logit depends on)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from relprop.errors import InputError, first_line
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
MAX_PREFIX_TOKENS = 8  # class, distillation and register tokens that precede the patch tokens


@dataclass(frozen=True)
class MapLayout:
    """How a layer's activation holds its spatial map, and how it becomes B×C×h×w.

    `nchw`: convolutional maps as they are; `nhwc`: channels-last maps (Swin, ConvNeXt blocks'
    inner layers), permuted; `tokens`: B×N×C sequences of `prefix` leading tokens (class,
    distillation, registers: dropped) then the h×w patch tokens in row-major order (ViT, DeiT), so
    token `prefix + i*w + j` lands at row i, column j.
    """

    kind: str
    grid: tuple[int, int]
    prefix: int = 0

    def to_nchw(self, activation: Tensor) -> Tensor:
        if self.kind == "nhwc":
            return activation.permute(0, 3, 1, 2)
        if self.kind == "tokens":
            patches = activation[:, self.prefix:]
            return patches.transpose(1, 2).reshape(activation.shape[0], -1, *self.grid)
        return activation


def _is_grid(size: tuple[int, int], h: int, w: int) -> bool:
    """Is h×w the input `size` seen at one integer stride (each side rounded down or up)?"""
    height, width = size
    return any(h in (height // s, -(-height // s)) and w in (width // s, -(-width // s))
               for s in range(1, max(height, width) + 1))


def _token_grid(size: tuple[int, int], tokens: int) -> tuple[int, int] | None:
    for stride in range(1, max(size) + 1):
        if size[0] % stride == 0 and size[1] % stride == 0 and \
                (size[0] // stride) * (size[1] // stride) == tokens:
            return size[0] // stride, size[1] // stride
    return None


def prefix_tokens(model: nn.Module) -> int | None:
    """Leading non-patch tokens a transformer declares (timm `num_prefix_tokens`; torchvision's
    ViT has one class token); None: not declared, inferred from the shape instead."""
    count = getattr(model, "num_prefix_tokens", None)
    if isinstance(count, int):
        return count
    if isinstance(getattr(model, "class_token", None), torch.Tensor):
        return 1
    return None


def map_layout(shape: Sequence[int], size: tuple[int, int], prefix: int | None = None,
               min_cells: int = 2) -> MapLayout | None:
    """The layout of an activation of `shape` for an input of spatial `size`, None if it holds no
    spatial map of `min_cells` cells or more (a pooled vector, attention scores; by default a
    1×1 map, which a layer search passes over, but Grad-CAM of a named layer accepts: it is what
    the paper's `layer4[-1]` gives at 32 px).

    4-D: N×C×h×w when (h, w) is the input at some stride, else N×h×w×C when that matches (both:
    N×C×h×w). 3-D: tokens when N minus `prefix` (default: the fewest, up to 8, that fit) leading
    tokens is an exact h×w patch grid of the input.
    """
    if len(shape) == 4:
        for kind, (h, w) in (("nchw", shape[2:4]), ("nhwc", shape[1:3])):
            if h * w >= min_cells and _is_grid(size, int(h), int(w)):
                return MapLayout(kind, (int(h), int(w)))
        return None
    if len(shape) == 3:
        counts = [prefix] if prefix is not None else range(MAX_PREFIX_TOKENS + 1)
        for count in counts:
            cells = int(shape[1]) - count
            grid = _token_grid(size, cells) if cells >= min_cells else None
            if grid is not None:
                return MapLayout("tokens", grid, count)
    return None


def cam_layer_by_name(model: nn.Module, name: str) -> nn.Module:
    """`--cam-layer NAME`: a qualified module name such as `features.29` or `layer4.1`."""
    try:
        return model.get_submodule(name)
    except AttributeError:
        names = [n for n, _ in model.named_modules() if n][-4:]
        raise InputError(f"--cam-layer {name!r}: {type(model).__name__} has no such module "
                         f"(names look like {', '.join(names)})") from None


def find_cam_layer(model: nn.Module, inputs: Tensor) -> str:
    """Name of the module giving the last spatial feature map that the output depends on.

    One forward and backward on `inputs[:1]` with every module's output recorded: the last output
    (in the order modules finish) that holds a map (`map_layout`: N×C×h×w, channels-last, or patch
    tokens), has as many channels as the last such output, and whose spatial cells get a non-zero
    gradient of the top logit. Adaptive pooling is passed over (VGG's `avgpool(7)` only resizes).
    In a ViT that pools its class token the gradient skips the last block's outputs, whose patch
    tokens no longer reach the class token: the map is the last block's `norm1` (what pytorch-grad-cam's ViT
    example uses). Of modules returning the same tensor the innermost is named (`features.norm5`,
    not `features`). ResNets keep `layer4[-1]` (`default_cam_layer`), as the paper ran them.
    """
    x = inputs[:1].detach().clone().requires_grad_(True)
    size = (int(x.shape[-2]), int(x.shape[-1]))
    prefix = prefix_tokens(model)
    records: list[tuple[str, Tensor, MapLayout]] = []
    last_call: dict[str, int] = {}
    owner: dict[tuple[int, int], str] = {}

    def keep(name: str):
        def hook(module, args, output):
            if isinstance(module, _RESHAPING_POOLS) or not isinstance(output, Tensor):
                return
            layout = map_layout(output.shape, size, prefix)
            if layout is not None and output.requires_grad:
                # children finish first: the innermost; an in-place op (ReLU(inplace=True)) makes a
                # new version of the same tensor, which belongs to that op's module
                inner = owner.setdefault((id(output), output._version), name)
                last_call[inner] = len(records)
                records.append((inner, output, layout))
        return hook

    handles = [m.register_forward_hook(keep(n)) for n, m in model.named_modules() if n]
    try:
        with torch.enable_grad():
            logits = model(x)
            top = logits.flatten(1).max(1).values.sum()
            grads = torch.autograd.grad(top, [r[1] for r in records], allow_unused=True) \
                if records else []
    except (RuntimeError, TypeError, ValueError) as error:
        first = first_line(error)
        raise InputError(f"cannot find the CAM layer of {type(model).__name__} automatically "
                         f"({first}); name one with --cam-layer") from None
    finally:
        for handle in handles:
            handle.remove()
    channels = None
    for index in reversed(range(len(records))):
        name, output, layout = records[index]
        features = layout.to_nchw(output)
        channels = features.shape[1] if channels is None else channels
        grad = grads[index]
        if features.shape[1] != channels or grad is None or last_call.get(name) != index:
            continue
        if bool(layout.to_nchw(grad).abs().sum() > 0):
            return name
    if records and not any(g is not None and bool(g.abs().sum() > 0) for g in grads):
        raise InputError(f"cannot find the CAM layer of {type(model).__name__}: its top logit has "
                         "a zero gradient at every feature map (e.g. a zero-initialised head); name "
                         "one with --cam-layer")
    raise InputError(f"{type(model).__name__} has no spatial feature map for a CAM; name a layer "
                     "with --cam-layer")


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
    """A method on one layer's activations: given (a module or its name), or found on first use.

    The activation is read as a B×C×h×w map whatever its layout (`map_layout`: channels-last maps
    are permuted, token sequences lose their prefix tokens and are laid on their patch grid).
    """

    channels = 1

    def __init__(self, model: nn.Module, name: str, layer: nn.Module | str | None = None) -> None:
        super().__init__(model, name)
        self.layer = cam_layer_by_name(model, layer) if isinstance(layer, str) else layer

    def cam_layer(self, inputs: Tensor) -> nn.Module:
        if self.layer is None:
            self.layer = default_cam_layer(self.model, inputs)
        return self.layer

    def feature_map(self, activation: Tensor, inputs: Tensor) -> Tensor:
        """The hooked activation as B×C×h×w; a layer that holds no map is refused in one line."""
        if not isinstance(activation, Tensor):
            raise InputError(f"{self.name}: the CAM layer {type(self.layer).__name__} returns "
                             f"{type(activation).__name__}, not a tensor; pick another with --cam-layer")
        layout = map_layout(activation.shape, (int(inputs.shape[-2]), int(inputs.shape[-1])),
                            prefix_tokens(self.model), min_cells=1)
        if layout is None:
            raise InputError(f"{self.name}: the CAM layer {type(self.layer).__name__} gives shape "
                             f"{tuple(activation.shape)}, not a spatial map (N×C×h×w, N×h×w×C or "
                             "patch tokens); pick another with --cam-layer")
        return layout.to_nchw(activation)


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
            (grad,) = torch.autograd.grad(logits.gather(1, classes[:, None]).sum(), hook.output)
        activation, grad = self.feature_map(hook.output, x), self.feature_map(grad, x)
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
        activations = self.feature_map(hook.output, inputs)
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
