"""Backbone + FPN neck + dense detection head: the detection model, and how to build it.

Like `segmentation.py`, this fixes the top-level names that rules and
checkpoints see (`backbone`, `neck`, `head`); the neck and heads themselves,
the priors, losses and post-processing are in `tlflax.heads.detection`.
"""
from __future__ import annotations

import functools
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from tlflax.heads.detection import DETECTION_HEADS, FPN, Priors
from tlflax.models.segmentation import BACKBONE_VARIABLES

# Smallest input that gives every level of the default pyramid (stride 128) at least 1x1.
MIN_INIT_SIZE = 128


class DetectionModel(nn.Module):
  """`apply(variables, x_nhwc, train=False)` -> the head's dense outputs over all levels:
  {"cls_logits": [B, N, C], "box_regression": [B, N, 4]} (+ "centerness": [B, N] for FCOS),
  float32, in the order of `priors_for(module, image_size)`."""
  backbone: nn.Module
  neck: nn.Module
  head: nn.Module

  def __call__(self, x, train: bool = False) -> Dict[str, Any]:
    return self.head(self.pyramid(x, train), train)

  def pyramid(self, x, train: bool = False):
    """The FPN maps, finest first (what the head reads)."""
    return self.neck(self.backbone(x, train), train)


def _image_hw(image_size: Union[int, Sequence[int]]) -> Tuple[int, int]:
  if isinstance(image_size, int):
    return image_size, image_size
  height, width = image_size
  return int(height), int(width)


@functools.lru_cache(maxsize=32)
def _level_shapes(module: DetectionModel, height: int, width: int):
  def pyramid(x):
    return module.init_with_output(jax.random.key(0), x, method=DetectionModel.pyramid)[0]
  maps = jax.eval_shape(pyramid, jax.ShapeDtypeStruct((1, height, width, 3), jnp.float32))
  return tuple(tuple(m.shape[1:3]) for m in maps)


def priors_for(module: DetectionModel, image_size: Union[int, Sequence[int]]) -> Priors:
  """The anchors (RetinaNet) or points (FCOS) of `module` for inputs of `image_size` (an int
  for square inputs, or (height, width)), as static numpy arrays in `Priors`.

  The map sizes come from tracing the backbone and neck shape-only (no
  compute), so any backbone's rounding is right. Strides are the nominal
  8, 16, ..., 128; torchvision derives them as input // map size, which is
  the same when the size is a multiple of 128 (the recommended sizes).
  """
  height, width = _image_hw(image_size)
  shapes = _level_shapes(module, height, width)
  empty = [i for i, (h, w) in enumerate(shapes) if h == 0 or w == 0]
  if empty:
    raise ValueError(f"Input {height}x{width} is too small for the detection pyramid: levels "
                     f"{empty} (strides {[module.neck.level_strides()[i] for i in empty]}) are "
                     f"empty; use an image_size of at least {MIN_INIT_SIZE}.")
  strides = module.neck.level_strides()
  for (h, w), stride in zip(shapes, strides):
    if abs(h - height / stride) > 1 or abs(w - width / stride) > 1:
      raise ValueError(f"The pyramid level of stride {stride} is {h}x{w} for a {height}x"
                       f"{width} input, not about 1/{stride} of it: the backbone does not "
                       "downsample as its map names say (a dilated output_stride?); build it "
                       "without dilation for detection.")
  return module.head.priors(shapes, strides, (height, width))


def build_detection_model(head: str, backbone: nn.Module, *, num_classes: int,
                          fpn_channels: int = 256, dtype: Any = None,
                          head_kwargs: Optional[Mapping[str, Any]] = None,
                          neck_kwargs: Optional[Mapping[str, Any]] = None) -> DetectionModel:
  """The module for a registered head name ("retinanet", "fcos") on `backbone`, with an FPN
  over its `stride_8`, `stride_16`, `stride_32` maps plus P6, P7 (strides 8 ... 128)."""
  neck = FPN(channels=fpn_channels, dtype=dtype, **(neck_kwargs or {}))
  head_module = DETECTION_HEADS.get(head)(num_classes=num_classes, dtype=dtype,
                                          **(head_kwargs or {}))
  return DetectionModel(backbone=backbone, neck=neck, head=head_module)


def create_detection_model(head: str, backbone: str, *, num_classes: int,
                           pretrained_backbone: Union[bool, str, None] = None,
                           image_size: Union[int, Sequence[int], None] = None,
                           fpn_channels: int = 256, weights_dir: Optional[str] = None,
                           dtype: Any = None, frozen_bn: Tuple[str, ...] = (), seed: int = 0,
                           head_kwargs: Optional[Dict[str, Any]] = None,
                           neck_kwargs: Optional[Dict[str, Any]] = None,
                           **backbone_kwargs) -> Tuple[DetectionModel, Dict]:
  """Builds a detection model (`DetectionModel`) and its variables.

  Args:
    head: "retinanet" or "fcos" (`tlflax.heads.DETECTION_HEADS`).
    backbone: a registered model name (`tlflax.list_models()`) whose backbone
      returns `stride_8`, `stride_16`, `stride_32` maps (every zoo family).
    num_classes: foreground classes (no background class: sigmoid heads).
    pretrained_backbone: as `create_model`'s `pretrained` (True, a tag or a
      `.pth` path): only the checkpoint's `backbone/` variables are loaded,
      strictly; neck and head keep their fresh initialisation (logged).
    image_size: if given (int or (height, width)), checked now to give every
      pyramid level, so a too-small size fails here and not in the first step.
    fpn_channels: width of the FPN and the head towers (torchvision: 256).
    dtype: compute dtype (e.g. `jnp.bfloat16`); parameters and outputs stay float32.
    frozen_bn: regexes of backbone BatchNorm paths that keep running statistics.
    head_kwargs: head fields, e.g. `{"group_norm": True}` (RetinaNet v2) or
      `{"num_convs": 2}`; neck_kwargs: FPN fields, e.g. `{"extra_from": "c5"}`.
    backbone_kwargs: architecture options (`width_mult=0.25`, `layers=(1, 1, 1, 1)`).
  """
  from tlflax.models import MODELS, init_variables, load_pretrained, weight_config  # Cycle.
  spec = MODELS.get(backbone)
  module = build_detection_model(
      head, spec.backbone(dtype=dtype, frozen_bn=tuple(frozen_bn), **backbone_kwargs),
      num_classes=num_classes, fpn_channels=fpn_channels, dtype=dtype, head_kwargs=head_kwargs,
      neck_kwargs=neck_kwargs)
  if image_size is not None:
    priors_for(module, image_size)
  variables = init_variables(module, seed, max(MIN_INIT_SIZE, spec.init_size))
  if pretrained_backbone:
    weight = weight_config(backbone, pretrained_backbone)
    variables = load_pretrained(backbone, spec, variables, pretrained_backbone, weight,
                                weights_dir, only=BACKBONE_VARIABLES)
  return module, variables
