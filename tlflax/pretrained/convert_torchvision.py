"""torchvision state dicts -> flat tlflax variables (`params/...`, `batch_stats/...`).

Conversion is two steps: an architecture-specific renaming of module prefixes
(`features.3.conv.1.0` -> `backbone/features_3/dw/conv`), then the same
per-tensor rules for every model:
  conv weight  (O, I/g, kh, kw) -> kernel (kh, kw, I/g, O)
  linear weight (O, I)          -> kernel (I, O)
  BN weight / bias              -> scale / bias (params)
  BN running_mean / running_var -> mean / var   (batch_stats)
  num_batches_tracked           -> dropped (flax BatchNorm keeps no counter)
"""
from __future__ import annotations

import re
from typing import Callable, Dict, Mapping, Tuple

import numpy as np

from tlflax.registry import Registry

Flat = Dict[str, np.ndarray]
CONVERTERS = Registry("checkpoint converter")


def convert_tensor(module: str, leaf: str, value: np.ndarray, is_norm: bool) -> Tuple[str, np.ndarray]:
  """Maps one torch tensor of flax module path `module` to (flat key, array)."""
  value = np.asarray(value)
  if leaf in ("running_mean", "running_var"):
    return f"batch_stats/{module}/{leaf[len('running_'):]}", value.astype(np.float32)
  if leaf == "weight" and is_norm:
    return f"params/{module}/scale", value.astype(np.float32)
  if leaf == "weight" and value.ndim == 4:
    return f"params/{module}/kernel", np.ascontiguousarray(value.transpose(2, 3, 1, 0), np.float32)
  if leaf == "weight" and value.ndim == 2:
    return f"params/{module}/kernel", np.ascontiguousarray(value.T, np.float32)
  if leaf == "bias":
    return f"params/{module}/bias", value.astype(np.float32)
  raise ValueError(f"Don't know how to convert tensor {leaf!r} of shape {value.shape} "
                   f"(module {module}).")


def convert_state_dict(state_dict: Mapping[str, np.ndarray],
                       rename: Callable[[str, Mapping[str, np.ndarray]], str]) -> Flat:
  """Applies `rename(torch_module_prefix, state_dict) -> flax module path` and the tensor rules."""
  flat: Flat = {}
  for key, value in state_dict.items():
    prefix, leaf = key.rsplit(".", 1)
    if leaf == "num_batches_tracked":
      continue
    module = rename(prefix, state_dict)
    is_norm = module.endswith("/bn") or f"{prefix}.running_mean" in state_dict
    new_key, array = convert_tensor(module, leaf, value, is_norm)
    if new_key in flat:
      raise ValueError(f"Two checkpoint tensors map to {new_key} (second: {key}).")
    flat[new_key] = array
  return flat


def rename_mobilenet_v2(prefix: str, state_dict: Mapping[str, np.ndarray]) -> str:
  """torchvision MobileNetV2 module names -> tlflax MobileNetV2 paths."""
  if prefix == "classifier.1":
    return "head"
  m = re.fullmatch(r"features\.(\d+)\.([01])", prefix)  # Stem and last 1x1 conv.
  if m:
    return f"backbone/features_{m[1]}/{('conv', 'bn')[int(m[2])]}"
  m = re.fullmatch(r"features\.(\d+)\.conv\.(\d)(?:\.(\d))?", prefix)
  if not m:
    raise ValueError(f"Unexpected module {prefix!r} in a torchvision MobileNetV2 checkpoint.")
  block, child, sub = m[1], int(m[2]), m[3]
  has_expand = f"features.{block}.conv.3.weight" in state_dict
  layers = (("expand", "dw", "project/conv", "project/bn") if has_expand
            else ("dw", "project/conv", "project/bn"))
  name = layers[child]
  if sub is not None:
    name += ("/conv", "/bn")[int(sub)]
  return f"backbone/features_{block}/{name}"


CONVERTERS.register("torchvision:mobilenet_v2",
                    lambda sd: convert_state_dict(sd, rename_mobilenet_v2))


def rename_resnet(prefix: str, state_dict: Mapping[str, np.ndarray]) -> str:
  """torchvision ResNet module names -> tlflax paths (conv+bn pairs become one unit)."""
  del state_dict
  if prefix == "fc":
    return "head"
  if prefix in ("conv1", "bn1"):
    return f"backbone/conv1/{'conv' if prefix == 'conv1' else 'bn'}"
  m = re.fullmatch(r"layer(\d)\.(\d+)\.(conv|bn)(\d)", prefix)
  if m:
    return f"backbone/layer{m[1]}_{m[2]}/conv{m[4]}/{m[3]}"
  m = re.fullmatch(r"layer(\d)\.(\d+)\.downsample\.([01])", prefix)
  if m:
    return f"backbone/layer{m[1]}_{m[2]}/downsample/{('conv', 'bn')[int(m[3])]}"
  raise ValueError(f"Unexpected module {prefix!r} in a torchvision ResNet checkpoint.")


for _name in ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d",
              "resnext101_32x8d", "wide_resnet50_2", "wide_resnet101_2"):
  CONVERTERS.register(f"torchvision:{_name}", lambda sd: convert_state_dict(sd, rename_resnet))
