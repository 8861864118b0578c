"""The model zoo of the CIFAR distillation benchmarks. Every builder takes
`(num_classes, in_channels)` and returns a `TapModel`."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from kdsearch.models.base import TapModel, Taps, fold_batch_norm
from kdsearch.models.mobilenetv2 import MobileNetV2
from kdsearch.models.resnet import THIN, WIDE, ResNet
from kdsearch.models.resnet50 import ResNet50
from kdsearch.models.shufflenetv1 import ShuffleNetV1
from kdsearch.models.shufflenetv2 import ShuffleNetV2
from kdsearch.models.vgg import VGG
from kdsearch.models.wrn import WideResNet

Builder = Callable[[int, int], TapModel]

MODELS: dict[str, Builder] = {
    "resnet8": partial(ResNet, 8, THIN),
    "resnet14": partial(ResNet, 14, THIN),
    "resnet20": partial(ResNet, 20, THIN),
    "resnet32": partial(ResNet, 32, THIN),
    "resnet44": partial(ResNet, 44, THIN),
    "resnet56": partial(ResNet, 56, THIN),
    "resnet110": partial(ResNet, 110, THIN),
    "resnet8x4": partial(ResNet, 8, WIDE),
    "resnet32x4": partial(ResNet, 32, WIDE),
    "resnet50": ResNet50,
    "wrn_16_1": partial(WideResNet, 16, 1),
    "wrn_16_2": partial(WideResNet, 16, 2),
    "wrn_40_1": partial(WideResNet, 40, 1),
    "wrn_40_2": partial(WideResNet, 40, 2),
    "vgg8": partial(VGG, "vgg8"),
    "vgg11": partial(VGG, "vgg11"),
    "vgg13": partial(VGG, "vgg13"),
    "mobilenetv2": MobileNetV2,
    "shufflenetv1": ShuffleNetV1,
    "shufflenetv2": ShuffleNetV2,
}


def build_model(arch: str, num_classes: int, in_channels: int = 3) -> TapModel:
    """Instantiate a registered model by name."""
    return MODELS[arch](num_classes, in_channels)


def count_parameters(model: TapModel) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


__all__ = ["MODELS", "TapModel", "Taps", "build_model", "count_parameters", "fold_batch_norm"]
