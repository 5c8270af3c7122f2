"""What the zoo needs to know about one architecture (kept apart to avoid import cycles).

Each family module (`resnet.py`, `mobilenet.py`, ...) declares
`MODEL_SPECS = {"torchvision_name": ModelSpec(...)}`; `tlflax.models` collects
them into the one registry.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, Optional, Tuple

import flax.linen as nn


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """How to build one architecture and what its checkpoints look like.

  backbone: factory `(dtype=..., frozen_bn=..., **kwargs) -> nn.Module` whose
    `__call__(x, train)` returns named feature maps (`stride_4` ... `stride_32`,
    and any others the family names, e.g. MobileNetV3's `entry_stride_8`).
  stages: named stages as (name, regex over the path below `backbone/`), in
    input-to-output order; "train the last N stages" rules are built from them.
  pre_logits: factory `(dtype=..., **options) -> nn.Module` mapping the
    `stride_32` map to the vector the linear `head` reads (VGG's fc6/fc7,
    MobileNetV3's 1280-wide layer); None means global average pooling. The
    backbone options it names as parameters are passed to it too
    (MobileNetV3's width follows `width_mult`, as torchvision's).
  dropout: dropout before the head, as in the torchvision classifier.
  init_size: the input size used to create variables (parameter shapes never
    depend on it; some architectures need a minimum, e.g. Inception-v3 75 px).
  output_stride: `(output_stride) -> backbone kwargs` that dilate the last
    stages so the deepest map is at 1/8 or 1/16 of the input (DeepLab); None
    when the backbone cannot dilate.
  aux_feature: the map the auxiliary segmentation head reads by default, the
    one torchvision's segmentation models give it for this backbone (ResNet's
    `layer3`: `stride_16`; MobileNetV3's first stride-8 block: `entry_stride_8`).
  """
  backbone: Callable[..., nn.Module]
  stages: Tuple[Tuple[str, str], ...]
  pre_logits: Optional[Callable[..., nn.Module]] = None
  dropout: float = 0.0
  source_format: str = "torchvision"
  init_size: int = 32
  output_stride: Optional[Callable[[int], Dict[str, Any]]] = None
  aux_feature: str = "stride_16"
