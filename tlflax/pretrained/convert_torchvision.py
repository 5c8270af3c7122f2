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


def rename_densenet(prefix: str, state_dict: Mapping[str, np.ndarray]) -> str:
  """torchvision DenseNet module names -> tlflax paths (the `features.` prefix is dropped).

  torchvision's published DenseNet files predate its current names and say
  `denselayer1.norm.1` / `conv.2` for `denselayer1.norm1` / `conv2` (torchvision
  renames them with a regex when loading); both spellings are accepted here.
  """
  del state_dict
  if prefix == "classifier":
    return "head"
  m = re.fullmatch(r"features\.(conv0|norm0|norm5)", prefix)
  if m:
    return f"backbone/{m[1]}"
  m = re.fullmatch(r"features\.denseblock(\d)\.denselayer(\d+)\.(norm|conv)\.?([12])", prefix)
  if m:
    return f"backbone/denseblock{m[1]}/denselayer{m[2]}/{m[3]}{m[4]}"
  m = re.fullmatch(r"features\.transition(\d)\.(norm|conv)", prefix)
  if m:
    return f"backbone/transition{m[1]}/{m[2]}"
  raise ValueError(f"Unexpected module {prefix!r} in a torchvision DenseNet checkpoint "
                   "(expected features.conv0/norm0/norm5, features.denseblockI.denselayerJ."
                   "{norm1,conv1,norm2,conv2} or its old form norm.1/conv.2, "
                   "features.transitionI.{norm,conv}, classifier).")


for _name in ("densenet121", "densenet161", "densenet169", "densenet201"):
  CONVERTERS.register(f"torchvision:{_name}", lambda sd: convert_state_dict(sd, rename_densenet))


def _rename_features_fc(prefix: str, fc_layers: Mapping[str, str], family: str) -> str:
  """`features.i` keeps its index; the classifier's Linears map by their index in `fc_layers`."""
  m = re.fullmatch(r"features\.(\d+)", prefix)
  if m:
    return f"backbone/features_{m[1]}"
  if prefix in fc_layers:
    return fc_layers[prefix]
  raise ValueError(f"Unexpected module {prefix!r} in a torchvision {family} checkpoint "
                   f"(expected features.<i> or one of {', '.join(fc_layers)}).")


def rename_vgg(prefix: str, state_dict: Mapping[str, np.ndarray]) -> str:
  """torchvision VGG (plain and _bn) module names -> tlflax paths.

  fc6's weight needs no permutation: `FCPreLogits` flattens in torch's (C, H, W) order.
  """
  del state_dict
  return _rename_features_fc(prefix, {"classifier.0": "pre_logits/fc6",
                                      "classifier.3": "pre_logits/fc7",
                                      "classifier.6": "head"}, "VGG")


def rename_alexnet(prefix: str, state_dict: Mapping[str, np.ndarray]) -> str:
  """torchvision AlexNet module names -> tlflax paths (its classifier starts with a Dropout)."""
  del state_dict
  return _rename_features_fc(prefix, {"classifier.1": "pre_logits/fc6",
                                      "classifier.4": "pre_logits/fc7",
                                      "classifier.6": "head"}, "AlexNet")


for _name in ("vgg11", "vgg11_bn", "vgg13", "vgg13_bn", "vgg16", "vgg16_bn", "vgg19", "vgg19_bn"):
  CONVERTERS.register(f"torchvision:{_name}", lambda sd: convert_state_dict(sd, rename_vgg))
CONVERTERS.register("torchvision:alexnet", lambda sd: convert_state_dict(sd, rename_alexnet))


def rename_efficientnet(prefix: str, state_dict: Mapping[str, np.ndarray]) -> str:
  """torchvision EfficientNet-B* module names -> tlflax EfficientNet paths.

  An MBConv's `block` is [expand], dw, se, project: without the expand conv
  (expand ratio 1) the indices shift down by one.
  """
  if prefix == "classifier.1":
    return "head"
  m = re.fullmatch(r"features\.(\d+)\.([01])", prefix)  # Stem and the 1x1 head conv.
  if m:
    return f"backbone/features_{m[1]}/{('conv', 'bn')[int(m[2])]}"
  m = re.fullmatch(r"features\.(\d+)\.(\d+)\.block\.(\d)\.(0|1|fc1|fc2)", prefix)
  if not m:
    raise ValueError(f"Unexpected module {prefix!r} in a torchvision EfficientNet checkpoint "
                     "(expected features.<i>.{0,1}, features.<i>.<j>.block.<k>.*, classifier.1).")
  stage, block, child, part = m[1], m[2], int(m[3]), m[4]
  has_expand = f"features.{stage}.{block}.block.3.0.weight" in state_dict
  layers = ("expand", "dw", "se", "project") if has_expand else ("dw", "se", "project")
  if child >= len(layers) or (layers[child] == "se") != part.startswith("fc"):
    raise ValueError(f"Unexpected module {prefix!r} in a torchvision EfficientNet checkpoint.")
  sub = part if part.startswith("fc") else ("conv", "bn")[int(part)]
  return f"backbone/features_{stage}_{block}/{layers[child]}/{sub}"


for _name in [f"efficientnet_b{_i}" for _i in range(8)]:
  CONVERTERS.register(f"torchvision:{_name}",
                      lambda sd: convert_state_dict(sd, rename_efficientnet))


def _mobilenet_v3_block_children(block: str, state_dict: Mapping[str, np.ndarray]) -> Dict[int, str]:
  """Index -> name of the children of `features.<block>.block`: [expand] dw [se] project."""
  head = f"features.{block}.block."
  indices = sorted({int(k[len(head):].split(".")[0]) for k in state_dict if k.startswith(head)})
  se = [i for i in indices if f"{head}{i}.fc1.weight" in state_dict]
  expand = len(indices) - len(se) == 3
  layout = ["expand"] * expand + ["dw"] + ["se"] * bool(se) + ["project"]
  if indices != list(range(len(layout))) or se != [i for i, n in enumerate(layout) if n == "se"]:
    raise ValueError(f"features.{block}.block has children {indices} (squeeze-excitation at "
                     f"{se}); a torchvision MobileNetV3 block has [expand] dw [se] project.")
  return dict(enumerate(layout))


def rename_mobilenet_v3(prefix: str, state_dict: Mapping[str, np.ndarray]) -> str:
  """torchvision MobileNetV3 module names -> tlflax paths (classifier.0 is `pre_logits/fc`)."""
  if prefix == "classifier.0":  # Linear -> hardswish before the dropout and the head.
    return "pre_logits/fc"
  if prefix == "classifier.3":
    return "head"
  m = re.fullmatch(r"features\.(\d+)\.([01])", prefix)  # Stem and last 1x1 conv.
  if m:
    return f"backbone/features_{m[1]}/{('conv', 'bn')[int(m[2])]}"
  m = re.fullmatch(r"features\.(\d+)\.block\.(\d+)\.(0|1|fc1|fc2)", prefix)
  if not m:
    raise ValueError(f"Unexpected module {prefix!r} in a torchvision MobileNetV3 checkpoint.")
  child = _mobilenet_v3_block_children(m[1], state_dict)[int(m[2])]
  leaf = {"0": "conv", "1": "bn"}.get(m[3], m[3])
  if (child == "se") != (leaf in ("fc1", "fc2")):
    raise ValueError(f"Unexpected module {prefix!r} in a torchvision MobileNetV3 checkpoint.")
  return f"backbone/features_{m[1]}/{child}/{leaf}"


for _name in ("mobilenet_v3_large", "mobilenet_v3_small"):
  CONVERTERS.register(f"torchvision:{_name}",
                      lambda sd: convert_state_dict(sd, rename_mobilenet_v3))

_INCEPTION_MODULE = re.compile(
    r"(Conv2d_(?:1a_3x3|2a_3x3|2b_3x3|3b_1x1|4a_3x3)|Mixed_(?:5[bcd]|6[a-e]|7[abc]))"
    r"(?:\.(branch[0-9a-z_]+))?\.(conv|bn)")


def rename_inception_v3(prefix: str, state_dict: Mapping[str, np.ndarray]) -> str:
  """torchvision Inception3 module names -> tlflax paths ("." -> "/")."""
  del state_dict
  if prefix == "fc":
    return "head"
  m = _INCEPTION_MODULE.fullmatch(prefix)
  if not m:
    raise ValueError(f"Unexpected module {prefix!r} in a torchvision Inception-v3 checkpoint.")
  return "backbone/" + "/".join(part for part in m.groups() if part)


def convert_inception_v3(state_dict: Mapping[str, np.ndarray]) -> Flat:
  """Drops the training-only auxiliary classifier (`AuxLogits.*`), which tlflax doesn't build."""
  kept = {k: v for k, v in state_dict.items() if not k.startswith("AuxLogits.")}
  return convert_state_dict(kept, rename_inception_v3)


CONVERTERS.register("torchvision:inception_v3", convert_inception_v3)
