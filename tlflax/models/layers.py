"""Building blocks shared by the backbones: conv + BatchNorm + activation.

Names follow the structure of the torchvision models (a `conv` and a `bn` child
per block) so that the checkpoint converters stay short, readable tables.
"""
from __future__ import annotations

import re
from typing import Any, Callable, Optional, Sequence, Tuple

import flax.linen as nn
import jax.numpy as jnp

from tlflax.ops import conv as conv_ops
from tlflax.ops.depthwise import depthwise_conv2d

Padding = Tuple[Tuple[int, int], Tuple[int, int]]

# torchvision initialises convolutions with kaiming_normal(mode="fan_out").
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def same_padding(kernel: int, stride: int = 1, dilation: int = 1) -> Padding:
  """PyTorch-style symmetric padding `(k - 1) // 2 * dilation`; not TF "SAME"."""
  p = (kernel - 1) // 2 * dilation
  return ((p, p), (p, p))


def batch_norm(parent: nn.Module, train: bool, name: str = "bn",
               epsilon: float = 1e-5, frozen_patterns: Sequence[str] = (),
               momentum: float = 0.9) -> nn.BatchNorm:
  """A torchvision-equivalent BatchNorm whose training mode is chosen per layer.

  `frozen_patterns` are regexes (full match) over the layer's path, e.g.
  `backbone/features_3/dw/bn`; a matching layer normalises with its running
  statistics and never updates them, even when `train=True`. This is how
  `bn_mode="follow_params"` freezes the statistics of frozen layers.
  flax's `momentum` is 1 - torch's: the default 0.9 is torch's 0.1; 0.99 is the
  0.01 of MobileNetV3/EfficientNet.
  """
  path = "/".join((*parent.path, name))
  frozen = any(re.fullmatch(p, path) for p in frozen_patterns)
  return nn.BatchNorm(use_running_average=not train or frozen, momentum=momentum,
                      epsilon=epsilon, dtype=getattr(parent, "dtype", None), name=name)


class DepthwiseConv(nn.Module):
  """Depthwise convolution (channel multiplier 1) with a per-platform kernel.

  The parameter is `kernel` of shape (kh, kw, 1, C), exactly what `nn.Conv`
  with `feature_group_count=C` would hold, so checkpoints do not depend on the
  implementation chosen by `tlflax.ops.depthwise`.
  """
  kernel_size: Tuple[int, int] = (3, 3)
  strides: Tuple[int, int] = (1, 1)
  padding: Padding = ((1, 1), (1, 1))
  use_bias: bool = False
  dilation: Tuple[int, int] = (1, 1)
  dtype: Any = None

  @nn.compact
  def __call__(self, x):
    channels = x.shape[-1]
    kernel = self.param("kernel", conv_init, (*self.kernel_size, 1, channels), jnp.float32)
    dtype = self.dtype or x.dtype
    y = depthwise_conv2d(x.astype(dtype), kernel.astype(dtype), strides=self.strides,
                         padding=self.padding, dilation=self.dilation)
    if self.use_bias:
      y = y + self.param("bias", nn.initializers.zeros, (channels,), jnp.float32).astype(dtype)
    return y


class ConvBN(nn.Module):
  """Conv (no bias) -> BatchNorm -> optional activation: torchvision's Conv2dNormActivation.

  `depthwise=True` makes a channel-multiplier-1 depthwise convolution that runs
  through `tlflax.ops.depthwise` (fast shifted form on CPU). `dilation` spaces
  the kernel taps (atrous conv); the default padding `(k - 1) // 2 * dilation`
  keeps the size at stride 1, as torchvision's Conv2dNormActivation.
  """
  features: int
  kernel_size: int = 3
  strides: int = 1
  depthwise: bool = False
  groups: int = 1
  activation: Optional[Callable] = nn.relu6
  padding: Optional[Padding] = None
  dilation: int = 1
  bn_epsilon: float = 1e-5
  bn_momentum: float = 0.9  # flax convention (1 - torch's momentum).
  frozen_bn: Tuple[str, ...] = ()
  dtype: Any = None

  @nn.compact
  def __call__(self, x, train: bool = False):
    k, s, d = self.kernel_size, self.strides, self.dilation
    padding = self.padding or same_padding(k, dilation=d)
    if self.depthwise:
      if x.shape[-1] != self.features:
        raise ValueError(f"{'/'.join(self.path)}: depthwise conv needs in == out channels, "
                         f"got {x.shape[-1]} -> {self.features}.")
      x = DepthwiseConv((k, k), (s, s), padding, dilation=(d, d), dtype=self.dtype,
                        name="conv")(x)
    else:
      # conv_ops: lax's convolution, with a GEMM weight gradient for 1x1 kernels on CPU.
      x = nn.Conv(self.features, (k, k), (s, s), padding=padding, use_bias=False,
                  kernel_dilation=(d, d), feature_group_count=self.groups,
                  kernel_init=conv_init, dtype=self.dtype, name="conv",
                  conv_general_dilated=conv_ops.conv_general_dilated)(x)
    x = batch_norm(self, train, epsilon=self.bn_epsilon, frozen_patterns=self.frozen_bn,
                   momentum=self.bn_momentum)(x)
    return self.activation(x) if self.activation is not None else x


class SqueezeExcitation(nn.Module):
  """Channel gating, torchvision's SqueezeExcitation: x * gate(fc2(act(fc1(mean(x))))).

  EfficientNet uses SiLU / sigmoid, MobileNetV3 ReLU / hard sigmoid. The two
  1x1 convs (with bias) are torchvision's `fc1` / `fc2` Conv2d modules, kept as
  convs so their kernels convert like every other conv.
  """
  squeeze_channels: int
  activation: Callable = nn.relu
  gate: Callable = nn.sigmoid
  dtype: Any = None

  @nn.compact
  def __call__(self, x):
    scale = jnp.mean(x, axis=(1, 2), keepdims=True)
    scale = nn.Conv(self.squeeze_channels, (1, 1), kernel_init=conv_init, dtype=self.dtype,
                    name="fc1")(scale)
    scale = nn.Conv(x.shape[-1], (1, 1), kernel_init=conv_init, dtype=self.dtype,
                    name="fc2")(self.activation(scale))
    return x * self.gate(scale)
