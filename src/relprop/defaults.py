"""Default models and preprocessing, in a module without torch so that `relprop --help` can name
them quickly and every package may import it."""

from __future__ import annotations

# What `relprop explain` uses without --weights: torchvision's best ImageNet ResNet-50.
DEFAULT_WEIGHTS = "ResNet50_Weights.IMAGENET1K_V2"
# What `relprop evaluate` uses without --weights: the paper's ImageNet model (torchvision's
# `resnet50(pretrained=True)`, as in the authors' code), preprocessed Resize 256 -> CenterCrop 224.
PAPER_WEIGHTS = "ResNet50_Weights.IMAGENET1K_V1"
MIN_FRAME_BATCH = 64  # evaluate: metric frames per forward, at least
# ImageNet normalization (torchvision's): what a model whose file names none is preprocessed with.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
