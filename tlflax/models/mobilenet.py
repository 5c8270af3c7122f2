"""MobileNetV2 (Sandler et al. 2018), structured exactly as torchvision's model.

Parameter paths mirror torchvision's modules so that conversion is a short
table (`tlflax/pretrained/convert_torchvision.py`):

  features.0.{0,1}          -> features_0/{conv,bn}
  features.i.conv.* (block) -> features_i/{expand,dw,project}/{conv,bn}
  features.18.{0,1}         -> features_18/{conv,bn}
"""
from __future__ import annotations

from typing import Any, Dict, Sequence, Tuple

import flax.linen as nn

from tlflax.models.layers import ConvBN
from tlflax.models.spec import ModelSpec

# (expand ratio t, output channels c, repeats n, first stride s), as in the paper.
INVERTED_RESIDUAL_SETTING: Tuple[Tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
    (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))

# Named stages (used by "train the last N stages" rules): regex over the path
# below `backbone/`. Stage k ends at the feature map of stride 2**(k+1).
STAGES: Tuple[Tuple[str, str], ...] = (
    ("stem", r"features_0"),
    ("stage1", r"features_1"),
    ("stage2", r"features_(2|3)"),
    ("stage3", r"features_([4-6])"),
    ("stage4", r"features_([7-9]|1[0-3])"),
    ("stage5", r"features_(1[4-8])"),
)


def make_divisible(value: float, divisor: int = 8) -> int:
  """torchvision's `_make_divisible`: round to a multiple, never below 90%."""
  new = max(divisor, int(value + divisor / 2) // divisor * divisor)
  return new + divisor if new < 0.9 * value else new


class InvertedResidual(nn.Module):
  """Expand (1x1) -> depthwise (3x3) -> project (1x1, linear), residual when shapes allow.

  `strides` is the architecture's; `keep_resolution` runs the depthwise conv at
  stride 1 instead (its stride became dilation of the later blocks) without
  adding a residual the architecture doesn't have. `dilation` is the depthwise
  conv's.
  """
  features: int
  strides: int
  expand_ratio: int
  dilation: int = 1
  keep_resolution: bool = False
  frozen_bn: Tuple[str, ...] = ()
  dtype: Any = None

  @nn.compact
  def __call__(self, x, train: bool = False):
    in_features = x.shape[-1]
    hidden = int(round(in_features * self.expand_ratio))
    kw = dict(frozen_bn=self.frozen_bn, dtype=self.dtype)
    y = x
    if self.expand_ratio != 1:
      y = ConvBN(hidden, 1, name="expand", **kw)(y, train)
    strides = 1 if self.keep_resolution else self.strides
    y = ConvBN(hidden, 3, strides, dilation=self.dilation, depthwise=True, name="dw",
               **kw)(y, train)
    y = ConvBN(self.features, 1, activation=None, name="project", **kw)(y, train)
    if self.strides == 1 and in_features == self.features:
      y = y + x
    return y


class MobileNetV2(nn.Module):
  """MobileNetV2 feature extractor: returns the feature maps at strides 4/8/16/32.

  The classifier lives outside (`tlflax.models.classifier`), so the same
  backbone serves detection and segmentation heads.

  `output_stride` 16 or 8 (DeepLab) turns every stride that would take the
  network past it into dilation, as TF DeepLab's MobileNetV2: the block whose
  stride goes keeps the current rate, the blocks after it get rate x stride.
  (torchvision's dilated MobileNetV3 also dilates that first block.) The keys
  stay the nominal `stride_4` ... `stride_32`; maps past the output stride keep
  its size (at 8: `stride_16` and `stride_32` are at 1/8 of the input).
  """
  width_mult: float = 1.0
  setting: Sequence[Tuple[int, int, int, int]] = INVERTED_RESIDUAL_SETTING
  last_channel: int = 1280
  output_stride: int = 32
  frozen_bn: Tuple[str, ...] = ()
  dtype: Any = None

  @nn.compact
  def __call__(self, x, train: bool = False) -> Dict[str, Any]:
    kw = dict(frozen_bn=self.frozen_bn, dtype=self.dtype)
    _check_output_stride(self.output_stride)
    x = ConvBN(make_divisible(32 * self.width_mult), 3, 2, name="features_0", **kw)(x, train)
    outputs, index = {}, 1
    current_stride, rate = 2, 1  # After the stem.
    for t, c, n, s in self.setting:
      for i in range(n):
        strides, dilation, keep = (s if i == 0 else 1), rate, False
        if strides > 1 and current_stride * strides > self.output_stride:
          keep, rate = True, rate * strides
        else:
          current_stride *= strides
        x = InvertedResidual(make_divisible(c * self.width_mult), strides, t, dilation, keep,
                             name=f"features_{index}", **kw)(x, train)
        index += 1
      # The last block before each stride-2 step ends a pyramid level.
      outputs[f"stride_{_stride_after(self.setting, t, c, n, s)}"] = x
    last = make_divisible(self.last_channel * max(1.0, self.width_mult))
    x = ConvBN(last, 1, name=f"features_{index}", **kw)(x, train)
    outputs["stride_32"] = x
    return {k: outputs[k] for k in ("stride_4", "stride_8", "stride_16", "stride_32")
            if k in outputs}


def _check_output_stride(output_stride: int) -> None:
  if output_stride not in (8, 16, 32):
    raise ValueError(f"MobileNetV2 output_stride must be 8, 16 or 32, got {output_stride!r}.")


def output_stride_kwargs(output_stride: int) -> Dict[str, Any]:
  """Backbone options for output stride 32, 16 or 8 (`ModelSpec.output_stride`)."""
  _check_output_stride(output_stride)
  return {"output_stride": output_stride}


def _stride_after(setting, t, c, n, s) -> int:
  """Total stride of the network after the group (t, c, n, s) of `setting`."""
  stride = 2  # The stem.
  for group in setting:
    stride *= group[3]
    if group == (t, c, n, s):
      return stride
  raise AssertionError("group not in setting")


MODEL_SPECS = {"mobilenet_v2": ModelSpec(MobileNetV2, STAGES, dropout=0.2,
                                         output_stride=output_stride_kwargs)}
