"""ResNet / ResNeXt / Wide-ResNet (He et al. 2016), structured as torchvision's models.

torchvision's "v1.5" layout: the stride of a bottleneck sits on its 3x3 conv.
Each conv+BN pair is one `ConvBN` unit, so parameter paths read
`backbone/layer2_0/conv1/conv/kernel`, `backbone/layer2_0/downsample/bn/scale`.
"""
from __future__ import annotations

import functools
from typing import Any, Dict, Sequence, Tuple

import flax.linen as nn
import jax.numpy as jnp

from tlflax.models.layers import ConvBN
from tlflax.models.spec import ModelSpec

STAGES: Tuple[Tuple[str, str], ...] = (
    ("stem", r"conv1"), ("stage1", r"layer1_\d+"), ("stage2", r"layer2_\d+"),
    ("stage3", r"layer3_\d+"), ("stage4", r"layer4_\d+"))


class _Block(nn.Module):
  """Fields shared by both residual blocks (torchvision's constructor arguments)."""
  planes: int
  strides: int = 1
  groups: int = 1
  base_width: int = 64
  frozen_bn: Tuple[str, ...] = ()
  dtype: Any = None


class BasicBlock(_Block):
  """Two 3x3 convs; used by ResNet-18/34."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    kw = dict(frozen_bn=self.frozen_bn, dtype=self.dtype)
    y = ConvBN(self.planes, 3, self.strides, activation=nn.relu, name="conv1", **kw)(x, train)
    y = ConvBN(self.planes, 3, activation=None, name="conv2", **kw)(y, train)
    return nn.relu(y + _shortcut(self, x, self.planes, train, kw))


class Bottleneck(_Block):
  """1x1 reduce -> 3x3 (strided, grouped for ResNeXt) -> 1x1 expand (x4)."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    kw = dict(frozen_bn=self.frozen_bn, dtype=self.dtype)
    width = int(self.planes * (self.base_width / 64.0)) * self.groups
    y = ConvBN(width, 1, activation=nn.relu, name="conv1", **kw)(x, train)
    y = ConvBN(width, 3, self.strides, activation=nn.relu, groups=self.groups, name="conv2",
               **kw)(y, train)
    y = ConvBN(self.planes * 4, 1, activation=None, name="conv3", **kw)(y, train)
    return nn.relu(y + _shortcut(self, x, self.planes * 4, train, kw))


def _shortcut(block: nn.Module, x, features: int, train: bool, kw):
  """Identity, or a strided 1x1 conv + BN when the shape changes (`downsample`)."""
  if block.strides == 1 and x.shape[-1] == features:
    return x
  return ConvBN(features, 1, block.strides, activation=None, name="downsample",
                **kw)(x, train)


class ResNet(nn.Module):
  """Feature extractor returning the maps after layer1..layer4 (strides 4, 8, 16, 32)."""
  block: Any = BasicBlock
  layers: Sequence[int] = (2, 2, 2, 2)
  groups: int = 1
  width_per_group: int = 64
  base_channels: int = 64  # 64 in every torchvision model; smaller for tiny test variants.
  frozen_bn: Tuple[str, ...] = ()
  dtype: Any = None

  @nn.compact
  def __call__(self, x, train: bool = False) -> Dict[str, Any]:
    kw = dict(frozen_bn=self.frozen_bn, dtype=self.dtype)
    x = ConvBN(self.base_channels, 7, 2, activation=nn.relu, name="conv1", **kw)(x, train)
    x = nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))
    outputs = {}
    for stage, blocks in enumerate(self.layers):
      planes = self.base_channels * 2 ** stage
      for i in range(blocks):
        strides = 2 if stage > 0 and i == 0 else 1
        x = self.block(planes, strides, self.groups, self.width_per_group,
                       name=f"layer{stage + 1}_{i}", **kw)(x, train)
      outputs[f"stride_{4 * 2 ** stage}"] = x
    return outputs


VARIANTS = {
    "resnet18": dict(block=BasicBlock, layers=(2, 2, 2, 2)),
    "resnet34": dict(block=BasicBlock, layers=(3, 4, 6, 3)),
    "resnet50": dict(block=Bottleneck, layers=(3, 4, 6, 3)),
    "resnet101": dict(block=Bottleneck, layers=(3, 4, 23, 3)),
    "resnet152": dict(block=Bottleneck, layers=(3, 8, 36, 3)),
    "resnext50_32x4d": dict(block=Bottleneck, layers=(3, 4, 6, 3), groups=32, width_per_group=4),
    "resnext101_32x8d": dict(block=Bottleneck, layers=(3, 4, 23, 3), groups=32,
                             width_per_group=8),
    "wide_resnet50_2": dict(block=Bottleneck, layers=(3, 4, 6, 3), width_per_group=128),
    "wide_resnet101_2": dict(block=Bottleneck, layers=(3, 4, 23, 3), width_per_group=128),
}

MODEL_SPECS = {name: ModelSpec(functools.partial(ResNet, **variant), STAGES)
               for name, variant in VARIANTS.items()}
