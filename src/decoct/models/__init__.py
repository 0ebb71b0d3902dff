"""Model registry. Every model has ``embed(x)`` (penultimate features) and ``feature_dim``.

``create_model(name, num_classes, channels, image_size, **kwargs)``; names:
``convnet`` (depth chosen from the image size unless given), ``convnetd3|d4|d5``,
``convnet_bn`` (batch norm, the CPU-sized teacher), ``resnet18``, ``resnet50``
(``stem=auto|cifar|imagenet``), ``resnet18_ap``, ``mlp``.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from decoct.models.convnet import ConvNet, depth_for_size
from decoct.models.mlp import MLP
from decoct.models.resnet import ResNetAP, TorchvisionResNet
from decoct.runtime.registry import Registry

MODELS: Registry[Callable[..., nn.Module]] = Registry("model")


@MODELS.register("convnet")
def _convnet(num_classes: int, channels: int, image_size: int, depth: int | None = None, **kw) -> nn.Module:
    return ConvNet(num_classes, channels, image_size, depth=depth or depth_for_size(image_size), **kw)


for _d in (3, 4, 5):
    MODELS.register(f"convnetd{_d}")(
        lambda num_classes, channels, image_size, _d=_d, **kw: ConvNet(num_classes, channels, image_size, depth=_d, **kw)
    )


@MODELS.register("convnet_bn")
def _convnet_bn(num_classes: int, channels: int, image_size: int, depth: int | None = None, **kw) -> nn.Module:
    kw.setdefault("norm", "batch")
    return ConvNet(num_classes, channels, image_size, depth=depth or depth_for_size(image_size), **kw)


@MODELS.register("resnet18")
def _resnet18(num_classes: int, channels: int, image_size: int, stem: str = "auto") -> nn.Module:
    return TorchvisionResNet("resnet18", num_classes, channels, image_size, stem)


@MODELS.register("resnet50")
def _resnet50(num_classes: int, channels: int, image_size: int, stem: str = "auto") -> nn.Module:
    return TorchvisionResNet("resnet50", num_classes, channels, image_size, stem)


@MODELS.register("resnet18_ap")
def _resnet18_ap(num_classes: int, channels: int, image_size: int, **kw) -> nn.Module:
    return ResNetAP(num_classes, channels, image_size, **kw)


@MODELS.register("mlp")
def _mlp(num_classes: int, channels: int, image_size: int, **kw) -> nn.Module:
    return MLP(num_classes, channels, image_size, **kw)


def create_model(name: str, num_classes: int, channels: int = 3, image_size: int = 32, **kwargs) -> nn.Module:
    """Build a registered model; unknown names or options raise naming them."""
    factory = MODELS.get(name)
    try:
        return factory(num_classes, channels, image_size, **kwargs)
    except TypeError as e:
        if "unexpected keyword" in str(e):
            raise ValueError(f"model {name!r} does not take option(s) {sorted(kwargs)}: {e}") from None
        raise


def model_for(name: str, info, **kwargs) -> nn.Module:
    """Build a model sized for a :class:`~decoct.data.types.DatasetInfo`."""
    if info.height != info.width:
        raise ValueError(f"models expect square images, dataset {info.name} is {info.height}x{info.width}")
    return create_model(name, info.num_classes, info.channels, info.height, **kwargs)


__all__ = ["MODELS", "create_model", "model_for", "ConvNet", "MLP", "ResNetAP", "TorchvisionResNet", "depth_for_size"]
