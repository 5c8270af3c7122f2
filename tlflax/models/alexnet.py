"""AlexNet as in torchvision (the "one weird trick" variant: 64-192-384-256-256 channels).

Parameter paths keep torchvision's indices: `features.i` -> `backbone/features_i`,
`classifier.1` / `classifier.4` -> `pre_logits/fc6` / `pre_logits/fc7`,
`classifier.6` -> `head`. Inputs need at least 63 px (torchvision's min_size):
below that the last max-pool has nothing to pool.
"""
from __future__ import annotations

import functools
from typing import Any, Dict, Tuple

import flax.linen as nn

from tlflax.models.spec import ModelSpec
from tlflax.ops import pooling
from tlflax.models.vgg import FCPreLogits

# torch's default Conv/Linear init (kaiming_uniform, a=sqrt(5)): U(+-1/sqrt(fan_in)).
# torchvision's AlexNet keeps it; biases start at zero here rather than uniform.
torch_default_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")

STAGES: Tuple[Tuple[str, str], ...] = (
    ("stage1", r"features_0"), ("stage2", r"features_3"), ("stage3", r"features_(6|8|10)"))


def _max_pool(x):
  return pooling.max_pool(x, (3, 3), (2, 2))  # Overlapping 3x3 stride-2 pool, VALID (floor mode).


class AlexNet(nn.Module):
  """AlexNet feature extractor.

  Nominal strides (the product of layer strides; at 224 px the maps are 55, 27,
  13 and 6 wide, since the unpadded pools shrink them a little more):
    stride_4:  ReLU(conv1) (`features.1`), 64 channels, the only stride-4 map;
    stride_8:  after max-pool 1 (`features.2`), 64 channels;
    stride_16: after max-pool 2 (`features.5`), 192 channels;
    stride_32: after max-pool 3 (`features.12`, the `features` output), 256 channels.
  """
  frozen_bn: Tuple[str, ...] = ()  # No BatchNorm; accepted like every backbone's.
  dtype: Any = None

  @nn.compact
  def __call__(self, x, train: bool = False) -> Dict[str, Any]:
    del train  # No BatchNorm or dropout in the feature extractor.
    conv = functools.partial(nn.Conv, kernel_init=torch_default_init, dtype=self.dtype)
    x = nn.relu(conv(64, (11, 11), (4, 4), padding=((2, 2), (2, 2)), name="features_0")(x))
    outputs = {"stride_4": x}
    x = outputs["stride_8"] = _max_pool(x)
    x = nn.relu(conv(192, (5, 5), padding=((2, 2), (2, 2)), name="features_3")(x))
    x = outputs["stride_16"] = _max_pool(x)
    for index, features in ((6, 384), (8, 256), (10, 256)):
      x = nn.relu(conv(features, (3, 3), padding=((1, 1), (1, 1)), name=f"features_{index}")(x))
    outputs["stride_32"] = _max_pool(x)
    return outputs


# AlexNet's classifier drops out the inputs of fc6 and fc7, not fc7's output: no
# dropout right before the head.
MODEL_SPECS = {"alexnet": ModelSpec(
    AlexNet, STAGES, pre_logits=functools.partial(
        FCPreLogits, pool_size=6, input_dropout=True, kernel_init=torch_default_init),
    dropout=0.0, init_size=64)}
