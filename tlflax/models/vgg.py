"""VGG-11/13/16/19 (Simonyan & Zisserman 2015), with and without BatchNorm, as in torchvision.

Parameter paths keep torchvision's `features` indices so conversion is a
short table (`tlflax/pretrained/convert_torchvision.py`):

  features.i (Conv2d, with bias)   -> backbone/features_i
  features.i+1 (BatchNorm2d, _bn)  -> backbone/features_{i+1}
  classifier.0 / classifier.3      -> pre_logits/fc6 / pre_logits/fc7
  classifier.6                     -> head

`FCPreLogits` (adaptive average pool -> flatten -> fc6 -> fc7) is shared with
AlexNet, whose classifier differs only in pool size and dropout placement.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Dict, Sequence, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from tlflax.models.layers import batch_norm, conv_init
from tlflax.models.spec import ModelSpec
from tlflax.ops import pooling

# Output channels of each 3x3 conv; "M" is a 2x2 stride-2 max-pool (the paper's configs).
CONFIGS: Dict[str, Tuple[Union[int, str], ...]] = {
    "A": (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    "B": (64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    "D": (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
          512, 512, 512, "M"),
    "E": (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
          512, 512, 512, 512, "M"),
}


def adaptive_avg_pool(x, output_size: Tuple[int, int]):
  """torch's AdaptiveAvgPool2d on NHWC, for any input size (smaller or larger than the output).

  Bin i of an axis of length n averages [floor(i*n/o), ceil((i+1)*n/o)), as
  torch does: bins overlap when n is not a multiple of o, and repeat a single
  value when n < o (a 32-px VGG input gives a 1x1 map, pooled to 7x7 copies).
  Rectangular bins make the pool separable, so each axis is done in turn.
  """
  for axis, out in zip((1, 2), output_size):
    n = x.shape[axis]
    if n != out:
      bins = [jax.lax.slice_in_dim(x, i * n // out, -(-(i + 1) * n // out), axis=axis)
              for i in range(out)]
      x = jnp.concatenate([b.mean(axis=axis, keepdims=True) for b in bins], axis=axis)
  return x


class FCPreLogits(nn.Module):
  """torchvision's VGG/AlexNet classifier up to (not including) its last Linear.

  adaptive avg pool (pool_size^2) -> flatten in torch's (C, H, W) order ->
  [dropout] -> fc6 -> ReLU -> dropout -> fc7 -> ReLU. The dropout after fc7
  (VGG) is `ModelSpec.dropout`, applied by the classifier right before `head`.

  The flatten transposes the pooled map to NCHW first, rather than permuting
  fc6's rows in the converter: fc6's kernel then has torch's row order, so it
  converts with the shared linear rule, exports back with a plain transpose,
  and the converter needs to know neither the pool size nor the channel count.
  The transpose moves pool_size^2 * C values per image (25k for VGG), nothing
  next to fc6's 100M multiply-adds.
  """
  pool_size: int = 7
  features: int = 4096
  dropout: float = 0.5
  input_dropout: bool = False  # AlexNet also drops out fc6's input; VGG does not.
  kernel_init: Callable = nn.initializers.normal(0.01)  # torchvision's VGG Linear init.
  dtype: Any = None

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = adaptive_avg_pool(x, (self.pool_size, self.pool_size))
    x = jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1)
    dense = functools.partial(nn.Dense, self.features, kernel_init=self.kernel_init,
                              dtype=self.dtype)
    if self.input_dropout:
      x = nn.Dropout(self.dropout, deterministic=not train)(x)
    x = nn.relu(dense(name="fc6")(x))
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    return nn.relu(dense(name="fc7")(x))


class VGG(nn.Module):
  """VGG feature extractor: the maps after max-pools 2..5 (strides 4, 8, 16, 32).

  `stride_32` is torchvision's `features` output (after the last max-pool),
  the map the classifier reads. Every conv has a bias, also in the BN variants.
  """
  config: Sequence[Union[int, str]] = CONFIGS["A"]
  batch_norm: bool = False
  frozen_bn: Tuple[str, ...] = ()
  dtype: Any = None

  @nn.compact
  def __call__(self, x, train: bool = False) -> Dict[str, Any]:
    outputs, stride = {}, 1
    for index, item in _layer_indices(self.config, self.batch_norm):
      if item == "M":
        x = pooling.max_pool(x, (2, 2), (2, 2))  # VALID: torch's floor mode.
        stride *= 2
        if stride >= 4:
          outputs[f"stride_{stride}"] = x
        continue
      x = nn.Conv(item, (3, 3), padding=((1, 1), (1, 1)), kernel_init=conv_init,
                  dtype=self.dtype, name=f"features_{index}")(x)
      if self.batch_norm:
        x = batch_norm(self, train, name=f"features_{index + 1}",
                       frozen_patterns=self.frozen_bn)(x)
      x = nn.relu(x)
    return outputs


def _layer_indices(config, with_bn: bool):
  """(torchvision `features` index, config item) pairs: a conv takes 2 slots (3 with BN)."""
  index = 0
  for item in config:
    yield index, item
    index += 1 if item == "M" else (3 if with_bn else 2)


def vgg_stages(config, with_bn: bool) -> Tuple[Tuple[str, str], ...]:
  """One stage per conv block (stage k ends at max-pool k); regexes over `features_i`."""
  stages, block = [], []
  for index, item in _layer_indices(config, with_bn):
    if item == "M":
      stages.append((f"stage{len(stages) + 1}", f"features_({'|'.join(block)})"))
      block = []
    else:
      block += [str(index), str(index + 1)] if with_bn else [str(index)]
  return tuple(stages)


VARIANTS = {f"vgg{depth}{suffix}": dict(config=CONFIGS[cfg], batch_norm=bool(suffix))
            for depth, cfg in ((11, "A"), (13, "B"), (16, "D"), (19, "E"))
            for suffix in ("", "_bn")}

# Stage regexes depend on the variant (they name `features` indices), so one per model.
STAGES = {name: vgg_stages(v["config"], v["batch_norm"]) for name, v in VARIANTS.items()}

MODEL_SPECS = {
    name: ModelSpec(functools.partial(VGG, **variant), STAGES[name],
                    pre_logits=functools.partial(FCPreLogits, pool_size=7), dropout=0.5)
    for name, variant in VARIANTS.items()}
