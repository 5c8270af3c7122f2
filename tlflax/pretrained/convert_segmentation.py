"""torchvision segmentation state dicts (FCN, DeepLabV3) -> flat tlflax variables.

torchvision's `_SimpleSegmentationModel` holds `backbone` (the classifier
network without its pooling and fc, through `IntermediateLayerGetter`, so
its keys are the classifier's under `backbone.`), `classifier` (the head)
and `aux_classifier`. The backbone reuses the classification renamer; the
heads map as:

  FCNHead        classifier.0/1 (conv, bn) -> head/conv/{conv,bn}; .4 -> head/classifier
  DeepLabHead    classifier.0.convs.0.{0,1}      -> head/aspp/conv_0/{conv,bn}   (1x1)
                 classifier.0.convs.i.{0,1}      -> head/aspp/conv_i/{conv,bn}   (rate i)
                 classifier.0.convs.last.{1,2}   -> head/aspp/pool/{conv,bn}     (after the pool)
                 classifier.0.project.{0,1}      -> head/aspp/project/{conv,bn}
                 classifier.1 / .2 / .4          -> head/conv/conv, head/conv/bn, head/classifier
  aux_classifier (an FCNHead)                    -> aux_head/...

deeplabv3_mobilenet_v3_large's backbone is the `features` Sequential itself
(`backbone.<index>...`, its stride-8 map `backbone.4` feeding the aux head);
it runs as `create_segmentation_model("deeplabv3", "mobilenet_v3_large",
output_stride=16, aux=True, head_kwargs={"rates": (12, 24, 36)})`, the rates
being torchvision's there rather than the paper's (6, 12, 18).
"""
from __future__ import annotations

import re
from typing import Callable, Mapping

import numpy as np

from tlflax.pretrained.convert_torchvision import (CONVERTERS, Flat, convert_state_dict,
                                                   rename_mobilenet_v3, rename_resnet)

Rename = Callable[[str, Mapping[str, np.ndarray]], str]
_FCN_LAYERS = {"0": "conv/conv", "1": "conv/bn", "4": "classifier"}
_DEEPLAB_LAYERS = {"1": "conv/conv", "2": "conv/bn", "4": "classifier"}


def rename_fcn_head(prefix: str, state_dict: Mapping[str, np.ndarray], root: str) -> str:
  """FCNHead `<torch root>.{0,1,4}` -> `<root>/...`."""
  del state_dict
  layer = _FCN_LAYERS.get(prefix.rsplit(".", 1)[-1])
  if layer is None:
    raise ValueError(f"Unexpected module {prefix!r} in a torchvision FCNHead (expected "
                     "indices 0 (conv), 1 (bn), 4 (classifier)).")
  return f"{root}/{layer}"


def rename_deeplab_head(prefix: str, state_dict: Mapping[str, np.ndarray]) -> str:
  """DeepLabHead (ASPP, conv, bn, classifier) under `classifier.` -> `head/...`."""
  inner = prefix[len("classifier."):]
  if inner in _DEEPLAB_LAYERS:
    return f"head/{_DEEPLAB_LAYERS[inner]}"
  m = re.fullmatch(r"0\.project\.([01])", inner)
  if m:
    return f"head/aspp/project/{('conv', 'bn')[int(m[1])]}"
  m = re.fullmatch(r"0\.convs\.(\d+)\.([012])", inner)
  if m:
    # The pooling branch is the one with a module at index 2 (0 is the parameterless pool).
    if f"classifier.0.convs.{m[1]}.2.weight" in state_dict:
      return f"head/aspp/pool/{('', 'conv', 'bn')[int(m[2])]}"
    return f"head/aspp/conv_{m[1]}/{('conv', 'bn')[int(m[2])]}"
  raise ValueError(f"Unexpected module {prefix!r} in a torchvision DeepLabHead (expected "
                   "classifier.0.convs.*, classifier.0.project.*, classifier.{1,2,4}).")


def convert_segmentation(state_dict: Mapping[str, np.ndarray], rename_backbone: Rename,
                         rename_head: Rename) -> Flat:
  """Backbone keys lose their `backbone.` prefix and go through the classification
  renamer (which maps to `backbone/...`); heads through `rename_head` / FCNHead."""
  backbone = {k[len("backbone."):]: v for k, v in state_dict.items()
              if k.startswith("backbone.")}
  heads = {k: v for k, v in state_dict.items() if not k.startswith("backbone.")}
  unknown = sorted(k for k in heads if not k.startswith(("classifier.", "aux_classifier.")))
  if unknown:
    raise ValueError(f"Unexpected keys in a torchvision segmentation checkpoint: {unknown[:5]} "
                     "(expected backbone.*, classifier.*, aux_classifier.*).")

  def rename(prefix, sd):
    if prefix.startswith("aux_classifier."):
      return rename_fcn_head(prefix, sd, "aux_head")
    return rename_head(prefix, sd)

  flat = convert_state_dict(backbone, rename_backbone)
  flat.update(convert_state_dict(heads, rename))
  return flat


def convert_deeplabv3_mobilenet_v3(state_dict: Mapping[str, np.ndarray]) -> Flat:
  """torchvision's backbone here is the classifier's `features` (`backbone.4.block...`):
  restoring the `features.` level lets the classification renamer map it."""
  restored = {(f"backbone.features.{k[len('backbone.'):]}" if k.startswith("backbone.") else k): v
              for k, v in state_dict.items()}
  return convert_segmentation(restored, rename_mobilenet_v3, rename_deeplab_head)


def _register(model: str, rename_backbone: Rename, rename_head: Rename) -> None:
  CONVERTERS.register(f"torchvision:{model}",
                      lambda sd: convert_segmentation(sd, rename_backbone, rename_head))


_fcn = lambda prefix, sd: rename_fcn_head(prefix, sd, "head")
for _depth in (50, 101):
  _register(f"fcn_resnet{_depth}", rename_resnet, _fcn)
  _register(f"deeplabv3_resnet{_depth}", rename_resnet, rename_deeplab_head)
CONVERTERS.register("torchvision:deeplabv3_mobilenet_v3_large", convert_deeplabv3_mobilenet_v3)
