"""The model zoo: one registry, one call.

`create_model("mobilenet_v2", pretrained=True, num_classes=10)` returns the
Flax module and its variables, with the backbone filled from the converted
ImageNet checkpoint and a freshly initialised head for the new class count.
"""
from __future__ import annotations

import functools
import inspect
import logging
import os
from typing import Any, Dict, Optional, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from tlflax.models import (alexnet, densenet, efficientnet, inception, mobilenet, mobilenet_v3,
                           resnet, vgg)
from tlflax.models.classifier import ImageClassifier
from tlflax.models.detection import (DetectionModel, build_detection_model,  # noqa: F401
                                     create_detection_model, priors_for)
from tlflax.models.segmentation import (BACKBONE_VARIABLES, SegmentationModel, backbone_options,
                                        build_segmentation_model)
from tlflax.models.spec import ModelSpec  # noqa: F401  (re-exported)
from tlflax.pretrained import weights as weights_lib
from tlflax.registry import Registry

log = logging.getLogger(__name__)


# Family modules, each declaring MODEL_SPECS; adding a family is one entry here.
_FAMILIES = (alexnet, densenet, efficientnet, inception, mobilenet, mobilenet_v3, resnet, vgg)

MODELS = Registry("model")
for _family in _FAMILIES:
  for _name, _spec in _family.MODEL_SPECS.items():
    MODELS.register(_name, _spec)


def list_models(pattern: Optional[str] = None, pretrained: bool = False):
  """Registered model names, filtered by a wildcard and/or having a default weight."""
  names = MODELS.names(pattern)
  return [n for n in names if n in weights_lib.DEFAULT_WEIGHT] if pretrained else names


def is_weight_path(pretrained: Any) -> bool:
  return isinstance(pretrained, (str, os.PathLike)) and (
      os.sep in str(pretrained) or str(pretrained).endswith((".pth", ".pt", ".bin")))


def weight_config(name: str, pretrained: Any) -> Optional[weights_lib.WeightConfig]:
  """The weight config behind `pretrained`: None for random init; for a file path, the
  model's default weight config (a fine-tuned file keeps its parent's mean/std)."""
  if not pretrained:
    return None
  if is_weight_path(pretrained):
    default = weights_lib.DEFAULT_WEIGHT.get(name)
    return weights_lib.WEIGHTS.get(default) if default else None
  return weights_lib.for_model(name, pretrained)


def create_model(name: str, *, num_classes: Optional[int] = None,
                 pretrained: Union[bool, str, None] = None, weights_dir: Optional[str] = None,
                 dtype: Any = None, frozen_bn: Tuple[str, ...] = (), seed: int = 0,
                 dropout: Optional[float] = None, **backbone_kwargs) -> Tuple[nn.Module, Dict]:
  """Builds a classifier and its variables.

  Args:
    name: a registered model name (`tlflax.list_models()`), torchvision naming.
    num_classes: classes of the head; defaults to the checkpoint's (1000).
    pretrained: None/False (random init), True (default ImageNet weight), a
      weight tag (`"tv_in1k"` or `"mobilenet_v2.tv_in1k"`) or a `.pth` path.
    weights_dir: an extra folder to search for weight files.
    dtype: compute dtype (e.g. `jnp.bfloat16`); parameters stay float32.
    frozen_bn: regexes of BatchNorm layer paths that keep running statistics in training.
    backbone_kwargs: architecture options (e.g. `width_mult=0.25` for a tiny variant).
  """
  spec = MODELS.get(name)
  weight = weight_config(name, pretrained)
  num_classes = num_classes or (weight.num_classes if weight else 1000)
  module = ImageClassifier(
      backbone=spec.backbone(dtype=dtype, frozen_bn=tuple(frozen_bn), **backbone_kwargs),
      num_classes=num_classes, dropout=spec.dropout if dropout is None else dropout,
      pre_logits=build_pre_logits(spec, dtype, backbone_kwargs), dtype=dtype)
  variables = init_variables(module, seed, spec.init_size)
  if pretrained:
    variables = load_pretrained(name, spec, variables, pretrained, weight, weights_dir)
  return module, variables


def build_pre_logits(spec: ModelSpec, dtype: Any,
                     backbone_kwargs: Dict[str, Any]) -> Optional[nn.Module]:
  """`spec.pre_logits` with `dtype` and the backbone options its signature names, so a
  layer whose width depends on the backbone's (MobileNetV3's `width_mult`) can follow it."""
  if spec.pre_logits is None:
    return None
  named = inspect.signature(spec.pre_logits).parameters
  return spec.pre_logits(dtype=dtype, **{k: v for k, v in backbone_kwargs.items() if k in named})


@functools.partial(jax.jit, static_argnums=(0, 2))
def _init(module: nn.Module, rng, size: int):
  # Parameter shapes don't depend on `size`; small is fast.
  return module.init(rng, jnp.zeros((1, size, size, 3), jnp.float32), train=False)


def init_variables(module: nn.Module, seed: int = 0, size: int = 32) -> Dict:
  # The "rbg" generator compiles ~3x faster than threefry for a model's worth
  # of initialisers (measured: MobileNetV2 init 9.6 s -> 3.3 s on 2 CPU cores).
  return dict(_init(module, jax.random.key(seed, impl="rbg"), size))


def load_pretrained(name, spec, variables, pretrained, weight, weights_dir,
                    only: Optional[str] = None) -> Dict:
  """Fills `variables` from the converted checkpoint; the head is kept if its shape differs.

  `only`: merge just the variables matching this regex (see `load.merge`).
  """
  from tlflax.pretrained import load as load_lib  # Deferred: conversion is rarely needed.
  if is_weight_path(pretrained):
    flat = load_lib.converted_file(str(pretrained), name, spec.source_format)
  else:
    flat = load_lib.converted_weight(weight, weights_dir)
  merged, report = load_lib.merge(variables, flat, only=only)
  log.info("Loaded %d pretrained tensors into %s; re-initialised: %s", len(report["loaded"]),
           name, load_lib.summarise_keys(report["reinitialised"]) or "none")
  return merged


def create_segmentation_model(head: str, backbone: str, *, num_classes: int,
                              pretrained_backbone: Union[bool, str, None] = None,
                              output_stride: Optional[int] = None, aux: bool = False,
                              aux_feature: Optional[str] = None,
                              weights_dir: Optional[str] = None, dtype: Any = None,
                              frozen_bn: Tuple[str, ...] = (), seed: int = 0,
                              head_kwargs: Optional[Dict[str, Any]] = None,
                              **backbone_kwargs) -> Tuple[SegmentationModel, Dict]:
  """Builds a segmentation model (`SegmentationModel`) and its variables.

  Args:
    head: "fcn", "deeplabv3" or "unet" (`tlflax.heads.SEGMENTATION_HEADS`).
    backbone: a registered model name whose backbone returns `stride_4` ...
      `stride_32` maps (FCN/DeepLabV3 read `stride_32`, U-Net all four, the
      aux head `aux_feature`).
    num_classes: classes of the head (and aux head).
    pretrained_backbone: as `create_model`'s `pretrained` (True, a tag or a
      `.pth` path): only the checkpoint's `backbone/` variables are loaded,
      strictly; head, aux head and the classifier's own head are left out.
    output_stride: 8 or 16 dilates the backbone's last stages (resnet*,
      mobilenet_v2; mobilenet_v3_* only 16); None keeps its native 32.
      torchvision's FCN/DeepLabV3 use 8 on ResNets, 16 on MobileNetV3-Large.
    aux: add torchvision's auxiliary FCNHead (output "aux").
    aux_feature: the map the aux head reads; None is the backbone's
      `ModelSpec.aux_feature`, torchvision's choice (`stride_16` for ResNets,
      `entry_stride_8` for MobileNetV3).
    head_kwargs: head fields, e.g. `{"decoder_channels": (128, 64, 32)}`.
      DeepLabV3's ASPP `rates` default to the paper's rule for the output
      stride: (12, 24, 36) at 8 (torchvision's), (6, 12, 18) at 16, (3, 6, 9) at 32.
      torchvision's deeplabv3_mobilenet_v3_large keeps (12, 24, 36) at 16: pass
      `{"rates": (12, 24, 36)}` to run its converted checkpoint.
    backbone_kwargs: architecture options (`width_mult=0.25`, `layers=(1, 1, 1, 1)`).
  """
  spec = MODELS.get(backbone)
  options = backbone_options(backbone, spec, output_stride, backbone_kwargs)
  module = build_segmentation_model(
      head, spec.backbone(dtype=dtype, frozen_bn=tuple(frozen_bn), **options),
      num_classes=num_classes, output_stride=output_stride, aux=aux,
      aux_feature=aux_feature or spec.aux_feature, dtype=dtype, frozen_bn=frozen_bn,
      head_kwargs=head_kwargs)
  variables = init_variables(module, seed, spec.init_size)
  if pretrained_backbone:
    weight = weight_config(backbone, pretrained_backbone)
    variables = load_pretrained(backbone, spec, variables, pretrained_backbone, weight,
                                weights_dir, only=BACKBONE_VARIABLES)
  return module, variables
