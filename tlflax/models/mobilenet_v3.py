"""MobileNetV3-Large/Small (Howard et al. 2019), structured exactly as torchvision's models.

Parameter paths mirror torchvision's modules so that conversion is a short
table (`tlflax/pretrained/convert_torchvision.py`):

  features.0.{0,1}                  -> backbone/features_0/{conv,bn}
  features.i.block.* (block)        -> backbone/features_i/{expand,dw,se,project}
  features.i.block.k.{fc1,fc2}      -> backbone/features_i/se/{fc1,fc2}
  features.N.{0,1} (last 1x1 conv)  -> backbone/features_N/{conv,bn}
  classifier.0 (Linear 960 -> 1280) -> pre_logits/fc (followed by hardswish)
  classifier.3 (final Linear)       -> head

All BatchNorms use torchvision's eps 0.001 and momentum 0.01 (flax 0.99).
`output_stride=16` is torchvision's `dilated=True` (its DeepLabV3 / LR-ASPP
backbones): same parameters, the last stage dilated instead of strided.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Dict, Sequence, Tuple

import flax.linen as nn
import jax.numpy as jnp

from tlflax.models.layers import ConvBN, SqueezeExcitation
from tlflax.models.mobilenet import make_divisible
from tlflax.models.spec import ModelSpec

# Per block, as torchvision's table (paper Tables 1 and 2) without the input
# width, which is the previous block's output:
# (kernel, expanded channels, output channels, squeeze-excitation, activation, stride).
# "RE" is ReLU, "HS" hardswish.
Block = Tuple[int, int, int, bool, str, int]
LARGE_SETTING: Tuple[Block, ...] = (
    (3, 16, 16, False, "RE", 1), (3, 64, 24, False, "RE", 2), (3, 72, 24, False, "RE", 1),
    (5, 72, 40, True, "RE", 2), (5, 120, 40, True, "RE", 1), (5, 120, 40, True, "RE", 1),
    (3, 240, 80, False, "HS", 2), (3, 200, 80, False, "HS", 1), (3, 184, 80, False, "HS", 1),
    (3, 184, 80, False, "HS", 1), (3, 480, 112, True, "HS", 1), (3, 672, 112, True, "HS", 1),
    (5, 672, 160, True, "HS", 2), (5, 960, 160, True, "HS", 1), (5, 960, 160, True, "HS", 1))
SMALL_SETTING: Tuple[Block, ...] = (
    (3, 16, 16, True, "RE", 2), (3, 72, 24, False, "RE", 2), (3, 88, 24, False, "RE", 1),
    (5, 96, 40, True, "HS", 2), (5, 240, 40, True, "HS", 1), (5, 240, 40, True, "HS", 1),
    (5, 120, 48, True, "HS", 1), (5, 144, 48, True, "HS", 1), (5, 288, 96, True, "HS", 2),
    (5, 576, 96, True, "HS", 1), (5, 576, 96, True, "HS", 1))
STEM_CHANNELS = 16

ACTIVATIONS: Dict[str, Callable] = {"RE": nn.relu, "HS": nn.hard_swish}

# torchvision's BatchNorm2d(eps=0.001, momentum=0.01) in flax's convention.
BN = dict(bn_epsilon=1e-3, bn_momentum=0.99)

# Named stages, regex over the path below `backbone/`; stage k ends at the
# feature map of stride 2**(k+1) (Small reaches stride 4 in its first block,
# so it has no stage1).
LARGE_STAGES: Tuple[Tuple[str, str], ...] = (
    ("stem", r"features_0"),
    ("stage1", r"features_1"),
    ("stage2", r"features_(2|3)"),
    ("stage3", r"features_([4-6])"),
    ("stage4", r"features_([7-9]|1[0-2])"),
    ("stage5", r"features_(1[3-6])"),
)
SMALL_STAGES: Tuple[Tuple[str, str], ...] = (
    ("stem", r"features_0"),
    ("stage2", r"features_1"),
    ("stage3", r"features_(2|3)"),
    ("stage4", r"features_([4-8])"),
    ("stage5", r"features_(9|1[0-2])"),
)



class InvertedResidual(nn.Module):
  """Expand (1x1, if wider) -> depthwise (3x3/5x5) -> optional SE -> project (1x1, linear).

  `dilation` is the depthwise conv's.
  """
  features: int
  kernel_size: int
  expanded: int
  use_se: bool
  activation: str
  strides: int
  dilation: int = 1
  frozen_bn: Tuple[str, ...] = ()
  dtype: Any = None

  @nn.compact
  def __call__(self, x, train: bool = False):
    kw = dict(frozen_bn=self.frozen_bn, dtype=self.dtype, **BN)
    # torchvision's rule: a dilated block's depthwise conv never strides (its stride
    # became the dilation), but the block keeps its stride for the residual decision.
    dw_strides = 1 if self.dilation > 1 else self.strides
    act = ACTIVATIONS[self.activation]
    y = x
    if self.expanded != x.shape[-1]:
      y = ConvBN(self.expanded, 1, activation=act, name="expand", **kw)(y, train)
    y = ConvBN(self.expanded, self.kernel_size, dw_strides, depthwise=True, activation=act,
               dilation=self.dilation, name="dw", **kw)(y, train)
    if self.use_se:
      # torchvision squeezes to _make_divisible(expanded // 4, 8) channels.
      y = SqueezeExcitation(make_divisible(self.expanded // 4), nn.relu, nn.hard_sigmoid,
                            dtype=self.dtype, name="se")(y)
    y = ConvBN(self.features, 1, activation=None, name="project", **kw)(y, train)
    if self.strides == 1 and x.shape[-1] == self.features:
      y = y + x
    return y


class MobileNetV3(nn.Module):
  """MobileNetV3 feature extractor: the maps at strides 4/8/16/32, and where each begins.

  `stride_32` is the last 1x1 conv (960 channels for Large, 576 for Small,
  after hardswish): torchvision's `features` output. Every other `stride_s` is
  the output of the last block before a stride-2 block. `entry_stride_s` is
  the output of the stride-2 block that enters stride s (torchvision's "C1" ...
  "C4" in its segmentation models, whose aux head reads `entry_stride_8`).
  `width_mult` scales every width as torchvision's `width_mult` does.

  `output_stride=16` is torchvision's `dilated=True`: every block of the last
  stage, its stride-2 block included, gets dilation 2, and that block's
  depthwise conv runs at stride 1. The names stay nominal: `stride_32` and
  `entry_stride_32` are then at 1/16 of the input.
  """
  setting: Sequence[Block] = LARGE_SETTING
  width_mult: float = 1.0
  output_stride: int = 32
  frozen_bn: Tuple[str, ...] = ()
  dtype: Any = None

  @nn.compact
  def __call__(self, x, train: bool = False) -> Dict[str, Any]:
    _check_output_stride(self.output_stride)
    kw = dict(frozen_bn=self.frozen_bn, dtype=self.dtype)
    width = lambda c: make_divisible(c * self.width_mult)
    x = ConvBN(width(STEM_CHANNELS), 3, 2, activation=nn.hard_swish, name="features_0",
               **BN, **kw)(x, train)
    outputs, stride, dilation = {}, 2, 1
    for index, (k, expanded, out, se, act, s) in enumerate(self.setting, start=1):
      if s == 2:  # The map before each downsampling ends a pyramid level.
        outputs[f"stride_{stride}"] = x
        stride *= s
        if stride > self.output_stride:
          dilation *= s
      x = InvertedResidual(width(out), k, width(expanded), se, act, s, dilation,
                           name=f"features_{index}", **kw)(x, train)
      if s == 2:
        outputs[f"entry_stride_{stride}"] = x
    x = ConvBN(6 * x.shape[-1], 1, activation=nn.hard_swish,
               name=f"features_{len(self.setting) + 1}", **BN, **kw)(x, train)
    outputs[f"stride_{stride}"] = x
    return {f"{kind}stride_{level}": outputs[f"{kind}stride_{level}"]
            for kind in ("", "entry_") for level in (4, 8, 16, 32)}


def _check_output_stride(output_stride: int) -> None:
  if output_stride not in (16, 32):
    raise ValueError(f"MobileNetV3 output_stride must be 16 (torchvision's dilated=True) or "
                     f"32, got {output_stride!r}.")


def output_stride_kwargs(output_stride: int) -> Dict[str, Any]:
  """Backbone options for output stride 32 or 16 (`ModelSpec.output_stride`)."""
  _check_output_stride(output_stride)
  return {"output_stride": output_stride}


class MobileNetV3PreLogits(nn.Module):
  """Global mean pool -> Linear (`fc`) -> hardswish: torchvision's `classifier[0:2]`.

  The width is torchvision's `last_channel`: 1280 (Large) or 1024 (Small)
  times the backbone's `width_mult`, made divisible by 8 (`_pre_logits`).
  """
  features: int = 1280
  dtype: Any = None

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train
    x = jnp.mean(x, axis=(1, 2))
    x = nn.Dense(self.features, kernel_init=nn.initializers.normal(0.01), dtype=self.dtype,
                 name="fc")(x)
    return nn.hard_swish(x)


def _pre_logits(last_channel: int):
  """The pre-logits factory; `create_model` passes it `width_mult`, which it names."""
  def factory(dtype=None, width_mult: float = 1.0):
    return MobileNetV3PreLogits(make_divisible(last_channel * width_mult), dtype=dtype)
  return factory


MODEL_SPECS = {
    "mobilenet_v3_large": ModelSpec(
        functools.partial(MobileNetV3, setting=LARGE_SETTING), LARGE_STAGES,
        pre_logits=_pre_logits(1280), dropout=0.2, output_stride=output_stride_kwargs,
        aux_feature="entry_stride_8"),
    "mobilenet_v3_small": ModelSpec(
        functools.partial(MobileNetV3, setting=SMALL_SETTING), SMALL_STAGES,
        pre_logits=_pre_logits(1024), dropout=0.2, output_stride=output_stride_kwargs,
        aux_feature="entry_stride_8"),
}
