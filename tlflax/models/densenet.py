"""DenseNet-BC (Huang et al. 2017), structured as torchvision's model.

Each dense layer is pre-activation (BN -> ReLU -> 1x1 conv -> BN -> ReLU -> 3x3
conv) and reads the concatenation of every earlier map of its block, so it
cannot reuse `ConvBN` (conv first). Parameter paths mirror torchvision's
module names with the `features.` prefix dropped:

  features.conv0 / norm0                          -> conv0 / norm0
  features.denseblockI.denselayerJ.{norm1,conv1,norm2,conv2}
                                                  -> denseblockI/denselayerJ/...
  features.transitionI.{norm,conv}                -> transitionI/{norm,conv}
  features.norm5                                  -> norm5

Feature maps (as DenseNet FPN / segmentation backbones use them): the output of
each dense block, i.e. the concatenated map before the next transition
(strides 4, 8, 16), and for stride 32 the last block after `norm5` + ReLU, the
map torchvision's forward pools for the classifier.
"""
from __future__ import annotations

import functools
from typing import Any, Dict, Sequence, Tuple

import flax.linen as nn
import jax.numpy as jnp

from tlflax.models.layers import batch_norm, conv_init
from tlflax.models.spec import ModelSpec
from tlflax.ops import pooling

# Stage k ends at the feature map of stride 2**(k+1); a transition (BN, 1x1
# conv, 2x2 average pool) starts the stage whose resolution it produces.
STAGES: Tuple[Tuple[str, str], ...] = (
    ("stem", r"conv0|norm0"),
    ("stage1", r"denseblock1"),
    ("stage2", r"transition1|denseblock2"),
    ("stage3", r"transition2|denseblock3"),
    ("stage4", r"transition3|denseblock4|norm5"),
)


def _conv(features: int, kernel: int, dtype: Any, name: str) -> nn.Conv:
  pad = (kernel - 1) // 2
  return nn.Conv(features, (kernel, kernel), padding=((pad, pad), (pad, pad)), use_bias=False,
                 kernel_init=conv_init, dtype=dtype, name=name)


class DenseLayer(nn.Module):
  """BN-ReLU-Conv1x1 (to bn_size * growth) -> BN-ReLU-Conv3x3 (to growth) -> dropout.

  Takes the list of the block's maps so far and concatenates them itself, so
  that under `memory_efficient` (remat) the concatenation, like torchvision's
  checkpointed `bn_function`, is recomputed in the backward pass, not stored.
  """
  growth_rate: int
  bn_size: int = 4
  drop_rate: float = 0.0
  frozen_bn: Tuple[str, ...] = ()
  dtype: Any = None

  @nn.compact
  def __call__(self, inputs: Sequence[Any], train: bool = False):
    x = jnp.concatenate(inputs, axis=-1)
    x = nn.relu(batch_norm(self, train, "norm1", frozen_patterns=self.frozen_bn)(x))
    x = _conv(self.bn_size * self.growth_rate, 1, self.dtype, "conv1")(x)
    x = nn.relu(batch_norm(self, train, "norm2", frozen_patterns=self.frozen_bn)(x))
    x = _conv(self.growth_rate, 3, self.dtype, "conv2")(x)
    return nn.Dropout(self.drop_rate, deterministic=not train)(x)


# Checkpointed dense layer: same parameters and numerics, activations recomputed
# in the backward pass. `train` (argument 2, counting self) selects Python branches.
_RematDenseLayer = nn.remat(DenseLayer, static_argnums=(2,))


class DenseBlock(nn.Module):
  """`num_layers` dense layers; returns the input and every new map, concatenated."""
  num_layers: int
  growth_rate: int
  bn_size: int = 4
  drop_rate: float = 0.0
  memory_efficient: bool = False
  frozen_bn: Tuple[str, ...] = ()
  dtype: Any = None

  @nn.compact
  def __call__(self, x, train: bool = False):
    layer_cls = _RematDenseLayer if self.memory_efficient else DenseLayer
    maps = [x]
    for j in range(self.num_layers):
      maps.append(layer_cls(self.growth_rate, self.bn_size, self.drop_rate, self.frozen_bn,
                            self.dtype, name=f"denselayer{j + 1}")(maps, train))
    return jnp.concatenate(maps, axis=-1)


class Transition(nn.Module):
  """BN -> ReLU -> 1x1 conv (halving the channels) -> 2x2 average pool, stride 2."""
  features: int
  frozen_bn: Tuple[str, ...] = ()
  dtype: Any = None

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.relu(batch_norm(self, train, "norm", frozen_patterns=self.frozen_bn)(x))
    x = _conv(self.features, 1, self.dtype, "conv")(x)
    return nn.avg_pool(x, (2, 2), (2, 2))


class DenseNet(nn.Module):
  """DenseNet feature extractor returning the maps at strides 4, 8, 16, 32.

  Fields are torchvision's `DenseNet` constructor arguments (a tiny variant
  for tests: `growth_rate=8, block_config=(1, 2, 2, 1), num_init_features=16`).
  `memory_efficient=True` rematerialises each dense layer in the backward pass
  (torchvision's checkpointing): less activation memory, more compute, same
  numbers and parameters.
  """
  growth_rate: int = 32
  block_config: Sequence[int] = (6, 12, 24, 16)
  num_init_features: int = 64
  bn_size: int = 4
  drop_rate: float = 0.0
  memory_efficient: bool = False
  frozen_bn: Tuple[str, ...] = ()
  dtype: Any = None

  @nn.compact
  def __call__(self, x, train: bool = False) -> Dict[str, Any]:
    if len(self.block_config) != 4:
      raise ValueError(f"DenseNet needs 4 dense blocks (one per stride 4..32), got "
                       f"block_config={tuple(self.block_config)}.")
    kw = dict(frozen_bn=self.frozen_bn, dtype=self.dtype)
    x = nn.Conv(self.num_init_features, (7, 7), (2, 2), padding=((3, 3), (3, 3)),
                use_bias=False, kernel_init=conv_init, dtype=self.dtype, name="conv0")(x)
    x = nn.relu(batch_norm(self, train, "norm0", frozen_patterns=self.frozen_bn)(x))
    x = pooling.max_pool(x, (3, 3), (2, 2), ((1, 1), (1, 1)))
    outputs = {}
    for i, num_layers in enumerate(self.block_config):
      if i > 0:
        x = Transition(x.shape[-1] // 2, name=f"transition{i}", **kw)(x, train)
      x = DenseBlock(num_layers, self.growth_rate, self.bn_size, self.drop_rate,
                     self.memory_efficient, name=f"denseblock{i + 1}", **kw)(x, train)
      outputs[f"stride_{4 * 2 ** i}"] = x
    # torchvision applies this ReLU in `forward`, after `features`, before pooling.
    x = batch_norm(self, train, "norm5", frozen_patterns=self.frozen_bn)(x)
    outputs["stride_32"] = nn.relu(x)
    return outputs


# (growth rate, block config, initial features) of torchvision's models.
VARIANTS = {
    "densenet121": dict(growth_rate=32, block_config=(6, 12, 24, 16), num_init_features=64),
    "densenet161": dict(growth_rate=48, block_config=(6, 12, 36, 24), num_init_features=96),
    "densenet169": dict(growth_rate=32, block_config=(6, 12, 32, 32), num_init_features=64),
    "densenet201": dict(growth_rate=32, block_config=(6, 12, 48, 32), num_init_features=64),
}

MODEL_SPECS = {name: ModelSpec(functools.partial(DenseNet, **variant), STAGES)
               for name, variant in VARIANTS.items()}
