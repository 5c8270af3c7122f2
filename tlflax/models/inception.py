"""Inception-v3 (Szegedy et al. 2016), structured exactly as torchvision's `Inception3`.

Parameter paths are torchvision's module names with "/" for ".":
`Mixed_6b.branch7x7_2.conv` -> `backbone/Mixed_6b/branch7x7_2/conv`, `fc` -> `head`.
Every conv is torchvision's BasicConv2d: conv (no bias) -> BN (eps 0.001) -> ReLU.

Not built: torchvision's `AuxLogits` classifier. torchvision only evaluates it
in training mode, as an extra loss on Mixed_6e; inference never uses it, and
fine-tuning here trains the main head only. The converter drops `AuxLogits.*`
tensors, so torchvision checkpoints (which contain them) load as they are.

Input: at least 75 x 75 px (the convs and pools of the stem use VALID
padding). Feature maps, named by nominal stride (their sizes are not exact
multiples: 299 px gives 71, 35, 17, 8):
  stride_4  = Conv2d_4a_3x3 (192 ch; the last map before maxpool2)
  stride_8  = Mixed_5d      (288 ch)
  stride_16 = Mixed_6e      (768 ch)
  stride_32 = Mixed_7c      (2048 ch; what the classifier pools)
"""
from __future__ import annotations

import functools
from typing import Any, Dict, Tuple, Union

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from tlflax.models.layers import batch_norm, conv_init
from tlflax.models.spec import ModelSpec
from tlflax.ops import pooling
from tlflax.pretrained.weights import IMAGENET_MEAN, IMAGENET_STD

Pair = Union[int, Tuple[int, int]]
MIN_SIZE = 75

STAGES: Tuple[Tuple[str, str], ...] = (
    ("stem", r"Conv2d_(1a|2a|2b)_3x3"),  # Ends at stride 2.
    ("stage2", r"Conv2d_(3b_1x1|4a_3x3)"),
    ("stage3", r"Mixed_5[bcd]"),
    ("stage4", r"Mixed_6[a-e]"),
    ("stage5", r"Mixed_7[abc]"),
)


def _pair(value: Pair) -> Tuple[int, int]:
  return (value, value) if isinstance(value, int) else tuple(value)


class BasicConv2d(nn.Module):
  """Conv (no bias, torch-style symmetric `padding`) -> BatchNorm(eps 0.001) -> ReLU."""
  features: int
  kernel_size: Pair
  strides: int = 1
  padding: Pair = 0
  frozen_bn: Tuple[str, ...] = ()
  dtype: Any = None

  @nn.compact
  def __call__(self, x, train: bool = False):
    ph, pw = _pair(self.padding)
    x = nn.Conv(self.features, _pair(self.kernel_size), (self.strides, self.strides),
                padding=((ph, ph), (pw, pw)), use_bias=False, kernel_init=conv_init,
                dtype=self.dtype, name="conv")(x)
    x = batch_norm(self, train, epsilon=1e-3, frozen_patterns=self.frozen_bn)(x)
    return nn.relu(x)


class _Mixed(nn.Module):
  """Fields of every Inception block; `conv` adds one named BasicConv2d."""
  frozen_bn: Tuple[str, ...] = ()
  dtype: Any = None

  def conv(self, name: str, features: int, kernel: Pair, strides: int = 1, padding: Pair = 0):
    return BasicConv2d(features, kernel, strides, padding, frozen_bn=self.frozen_bn,
                       dtype=self.dtype, name=name)


def _avg_pool_3x3(x):
  # torch's avg_pool2d(3, stride=1, padding=1) divides by 9 at the borders too.
  return nn.avg_pool(x, (3, 3), (1, 1), padding=((1, 1), (1, 1)), count_include_pad=True)


def _max_pool_3x3_s2(x):
  return pooling.max_pool(x, (3, 3), (2, 2))


class InceptionA(_Mixed):
  """35x35 block: 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool-1x1 (Mixed_5b-d)."""
  pool_features: int = 32

  @nn.compact
  def __call__(self, x, train: bool = False):
    a = self.conv("branch1x1", 64, 1)(x, train)
    b = self.conv("branch5x5_1", 48, 1)(x, train)
    b = self.conv("branch5x5_2", 64, 5, padding=2)(b, train)
    c = self.conv("branch3x3dbl_1", 64, 1)(x, train)
    c = self.conv("branch3x3dbl_2", 96, 3, padding=1)(c, train)
    c = self.conv("branch3x3dbl_3", 96, 3, padding=1)(c, train)
    d = self.conv("branch_pool", self.pool_features, 1)(_avg_pool_3x3(x), train)
    return jnp.concatenate([a, b, c, d], axis=-1)


class InceptionB(_Mixed):
  """Grid reduction 35 -> 17: 3x3/2 | 1x1-3x3-3x3/2 | maxpool/2 (Mixed_6a)."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    a = self.conv("branch3x3", 384, 3, strides=2)(x, train)
    b = self.conv("branch3x3dbl_1", 64, 1)(x, train)
    b = self.conv("branch3x3dbl_2", 96, 3, padding=1)(b, train)
    b = self.conv("branch3x3dbl_3", 96, 3, strides=2)(b, train)
    return jnp.concatenate([a, b, _max_pool_3x3_s2(x)], axis=-1)


class InceptionC(_Mixed):
  """17x17 block with factorised 7x7 convs (Mixed_6b-e)."""
  channels_7x7: int = 128

  @nn.compact
  def __call__(self, x, train: bool = False):
    c7 = self.channels_7x7
    a = self.conv("branch1x1", 192, 1)(x, train)
    b = self.conv("branch7x7_1", c7, 1)(x, train)
    b = self.conv("branch7x7_2", c7, (1, 7), padding=(0, 3))(b, train)
    b = self.conv("branch7x7_3", 192, (7, 1), padding=(3, 0))(b, train)
    c = self.conv("branch7x7dbl_1", c7, 1)(x, train)
    c = self.conv("branch7x7dbl_2", c7, (7, 1), padding=(3, 0))(c, train)
    c = self.conv("branch7x7dbl_3", c7, (1, 7), padding=(0, 3))(c, train)
    c = self.conv("branch7x7dbl_4", c7, (7, 1), padding=(3, 0))(c, train)
    c = self.conv("branch7x7dbl_5", 192, (1, 7), padding=(0, 3))(c, train)
    d = self.conv("branch_pool", 192, 1)(_avg_pool_3x3(x), train)
    return jnp.concatenate([a, b, c, d], axis=-1)


class InceptionD(_Mixed):
  """Grid reduction 17 -> 8: 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | maxpool/2 (Mixed_7a)."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    a = self.conv("branch3x3_1", 192, 1)(x, train)
    a = self.conv("branch3x3_2", 320, 3, strides=2)(a, train)
    b = self.conv("branch7x7x3_1", 192, 1)(x, train)
    b = self.conv("branch7x7x3_2", 192, (1, 7), padding=(0, 3))(b, train)
    b = self.conv("branch7x7x3_3", 192, (7, 1), padding=(3, 0))(b, train)
    b = self.conv("branch7x7x3_4", 192, 3, strides=2)(b, train)
    return jnp.concatenate([a, b, _max_pool_3x3_s2(x)], axis=-1)


class InceptionE(_Mixed):
  """8x8 block with split 1x3 / 3x1 branches (Mixed_7b-c)."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    a = self.conv("branch1x1", 320, 1)(x, train)
    b = self.conv("branch3x3_1", 384, 1)(x, train)
    b = jnp.concatenate([self.conv("branch3x3_2a", 384, (1, 3), padding=(0, 1))(b, train),
                         self.conv("branch3x3_2b", 384, (3, 1), padding=(1, 0))(b, train)], -1)
    c = self.conv("branch3x3dbl_1", 448, 1)(x, train)
    c = self.conv("branch3x3dbl_2", 384, 3, padding=1)(c, train)
    c = jnp.concatenate([self.conv("branch3x3dbl_3a", 384, (1, 3), padding=(0, 1))(c, train),
                         self.conv("branch3x3dbl_3b", 384, (3, 1), padding=(1, 0))(c, train)],
                        -1)
    d = self.conv("branch_pool", 192, 1)(_avg_pool_3x3(x), train)
    return jnp.concatenate([a, b, c, d], axis=-1)


def transform_input(x):
  """ImageNet-normalised input -> the (x - 0.5) / 0.5 scale of Google's original weights.

  torchvision's `transform_input=True` (set when it loads its ImageNet
  weight): per channel, x * (std / 0.5) + (mean - 0.5) / 0.5.
  """
  mean, std = np.asarray(IMAGENET_MEAN), np.asarray(IMAGENET_STD)
  scale, shift = (std / 0.5).astype(np.float32), ((mean - 0.5) / 0.5).astype(np.float32)
  return x * scale.astype(x.dtype) + shift.astype(x.dtype)


class Inception3(nn.Module):
  """Inception-v3 feature extractor (see the module docstring for the maps).

  transform_input: re-normalise ImageNet-normalised input as torchvision does
    for its pretrained weight. The registered `inception_v3` sets it True, so
    inputs are normalised with the weight's ImageNet mean/std like every other
    model; pass `transform_input=False` for input already at (x - 0.5) / 0.5.
  """
  transform_input: bool = False
  frozen_bn: Tuple[str, ...] = ()
  dtype: Any = None

  @nn.compact
  def __call__(self, x, train: bool = False) -> Dict[str, Any]:
    if min(x.shape[1:3]) < MIN_SIZE:
      raise ValueError(f"Inception-v3 needs inputs of at least {MIN_SIZE}x{MIN_SIZE} px, got "
                       f"{x.shape[1]}x{x.shape[2]}: resize the images (its weights expect 299).")
    if self.transform_input:
      x = transform_input(x)
    kw = dict(frozen_bn=self.frozen_bn, dtype=self.dtype)
    conv = lambda name, *args, **kwargs: BasicConv2d(*args, **kwargs, **kw, name=name)
    x = conv("Conv2d_1a_3x3", 32, 3, strides=2)(x, train)
    x = conv("Conv2d_2a_3x3", 32, 3)(x, train)
    x = conv("Conv2d_2b_3x3", 64, 3, padding=1)(x, train)
    x = _max_pool_3x3_s2(x)
    x = conv("Conv2d_3b_1x1", 80, 1)(x, train)
    stride_4 = x = conv("Conv2d_4a_3x3", 192, 3)(x, train)
    x = _max_pool_3x3_s2(x)
    x = InceptionA(pool_features=32, name="Mixed_5b", **kw)(x, train)
    x = InceptionA(pool_features=64, name="Mixed_5c", **kw)(x, train)
    stride_8 = x = InceptionA(pool_features=64, name="Mixed_5d", **kw)(x, train)
    x = InceptionB(name="Mixed_6a", **kw)(x, train)
    for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
      x = InceptionC(channels_7x7=c7, name=name, **kw)(x, train)
    stride_16 = x
    x = InceptionD(name="Mixed_7a", **kw)(x, train)
    x = InceptionE(name="Mixed_7b", **kw)(x, train)
    x = InceptionE(name="Mixed_7c", **kw)(x, train)
    return {"stride_4": stride_4, "stride_8": stride_8, "stride_16": stride_16, "stride_32": x}


MODEL_SPECS = {
    # transform_input=True as torchvision's inception_v3(weights=IMAGENET1K_V1) sets it.
    "inception_v3": ModelSpec(functools.partial(Inception3, transform_input=True), STAGES,
                              dropout=0.5, init_size=MIN_SIZE),
}
