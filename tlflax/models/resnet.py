"""ResNet / ResNeXt / Wide-ResNet (He et al. 2016), structured as torchvision's models.

torchvision's "v1.5" layout: the stride of a bottleneck sits on its 3x3 conv.
Each conv+BN pair is one `ConvBN` unit, so parameter paths read
`backbone/layer2_0/conv1/conv/kernel`, `backbone/layer2_0/downsample/bn/scale`.

`replace_stride_with_dilation` (torchvision's argument, used by its FCN and
DeepLabV3) turns the stride of layer2/3/4 into dilation of the later 3x3
convs, for dense prediction at output stride 16 or 8 with the same weights.
"""
from __future__ import annotations

import functools
from typing import Any, Dict, Optional, Sequence, Tuple

import flax.linen as nn

from tlflax.models.layers import ConvBN
from tlflax.models.spec import ModelSpec
from tlflax.ops import pooling

STAGES: Tuple[Tuple[str, str], ...] = (
    ("stem", r"conv1"), ("stage1", r"layer1_\d+"), ("stage2", r"layer2_\d+"),
    ("stage3", r"layer3_\d+"), ("stage4", r"layer4_\d+"))


class _Block(nn.Module):
  """Fields shared by both residual blocks (torchvision's constructor arguments).

  `dilation` is torchvision's: that of the 3x3 conv where the block's stride
  sits (or sat, before it became dilation). `stage_dilation` is that of the
  convs after it, on the block's output grid (None: `dilation`); they differ
  only in the first block of a dilated stage, and only BasicBlock has a 3x3
  conv after the strided one.
  """
  planes: int
  strides: int = 1
  groups: int = 1
  base_width: int = 64
  dilation: int = 1
  stage_dilation: Optional[int] = None
  frozen_bn: Tuple[str, ...] = ()
  dtype: Any = None


class BasicBlock(_Block):
  """Two 3x3 convs; used by ResNet-18/34.

  torchvision refuses dilation here; tlflax dilates conv1 by `dilation` and
  conv2 by `stage_dilation`, as the dilated residual networks of Yu et al.
  (2017): every conv then sees the receptive field it had with the stride.
  """

  @nn.compact
  def __call__(self, x, train: bool = False):
    kw = dict(frozen_bn=self.frozen_bn, dtype=self.dtype)
    y = ConvBN(self.planes, 3, self.strides, dilation=self.dilation, activation=nn.relu,
               name="conv1", **kw)(x, train)
    y = ConvBN(self.planes, 3, dilation=self.stage_dilation or self.dilation, activation=None,
               name="conv2", **kw)(y, train)
    return nn.relu(y + _shortcut(self, x, self.planes, train, kw))


class Bottleneck(_Block):
  """1x1 reduce -> 3x3 (strided, grouped for ResNeXt) -> 1x1 expand (x4)."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    kw = dict(frozen_bn=self.frozen_bn, dtype=self.dtype)
    width = int(self.planes * (self.base_width / 64.0)) * self.groups
    y = ConvBN(width, 1, activation=nn.relu, name="conv1", **kw)(x, train)
    y = ConvBN(width, 3, self.strides, dilation=self.dilation, activation=nn.relu,
               groups=self.groups, name="conv2", **kw)(y, train)
    y = ConvBN(self.planes * 4, 1, activation=None, name="conv3", **kw)(y, train)
    return nn.relu(y + _shortcut(self, x, self.planes * 4, train, kw))


def _shortcut(block: nn.Module, x, features: int, train: bool, kw):
  """Identity, or a strided 1x1 conv + BN when the shape changes (`downsample`)."""
  if block.strides == 1 and x.shape[-1] == features:
    return x
  return ConvBN(features, 1, block.strides, activation=None, name="downsample",
                **kw)(x, train)


class ResNet(nn.Module):
  """Feature extractor returning the maps after layer1..layer4 (strides 4, 8, 16, 32).

  `replace_stride_with_dilation[i]` replaces the stride 2 of layer{i+2} with
  dilation, as torchvision: that stage's first block keeps the previous
  dilation on its 3x3 conv and gets a stride-1 downsample, the later 3x3 convs
  are dilated by the accumulated factor. The keys stay the nominal
  `stride_4` ... `stride_32`; a dilated stage's map keeps the size of the
  previous one (with (False, True, True), `stride_16` and `stride_32` are at
  1/8 of the input).
  """
  block: Any = BasicBlock
  layers: Sequence[int] = (2, 2, 2, 2)
  groups: int = 1
  width_per_group: int = 64
  base_channels: int = 64  # 64 in every torchvision model; smaller for tiny test variants.
  replace_stride_with_dilation: Tuple[bool, bool, bool] = (False, False, False)
  frozen_bn: Tuple[str, ...] = ()
  dtype: Any = None

  @nn.compact
  def __call__(self, x, train: bool = False) -> Dict[str, Any]:
    kw = dict(frozen_bn=self.frozen_bn, dtype=self.dtype)
    dilate = _check_dilation(self.replace_stride_with_dilation)
    x = ConvBN(self.base_channels, 7, 2, activation=nn.relu, name="conv1", **kw)(x, train)
    x = pooling.max_pool(x, (3, 3), (2, 2), ((1, 1), (1, 1)))
    outputs, dilation = {}, 1
    for stage, blocks in enumerate(self.layers):
      planes = self.base_channels * 2 ** stage
      previous, strides = dilation, (2 if stage > 0 else 1)
      if stage > 0 and dilate[stage - 1]:
        dilation, strides = dilation * strides, 1
      for i in range(blocks):
        x = self.block(planes, strides if i == 0 else 1, self.groups, self.width_per_group,
                       dilation=previous if i == 0 else dilation, stage_dilation=dilation,
                       name=f"layer{stage + 1}_{i}", **kw)(x, train)
      outputs[f"stride_{4 * 2 ** stage}"] = x
    return outputs


def _check_dilation(replace_stride_with_dilation) -> Tuple[bool, bool, bool]:
  flags = tuple(replace_stride_with_dilation)
  if len(flags) != 3 or not all(isinstance(f, (bool, int)) for f in flags):
    raise ValueError("ResNet: replace_stride_with_dilation must be 3 booleans (for layer2, "
                     f"layer3, layer4), got {replace_stride_with_dilation!r}.")
  return tuple(bool(f) for f in flags)


def output_stride_kwargs(output_stride: int) -> Dict[str, Any]:
  """Backbone options for output stride 32, 16 or 8 (torchvision's FCN/DeepLabV3 use 8)."""
  flags = {32: (False, False, False), 16: (False, False, True), 8: (False, True, True)}
  if output_stride not in flags:
    raise ValueError(f"ResNet output_stride must be 8, 16 or 32, got {output_stride!r}.")
  return {"replace_stride_with_dilation": flags[output_stride]}


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

MODEL_SPECS = {name: ModelSpec(functools.partial(ResNet, **variant), STAGES,
                                output_stride=output_stride_kwargs)
               for name, variant in VARIANTS.items()}
