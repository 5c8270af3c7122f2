"""Segmentation decoders: FCN, DeepLabV3 (ASPP) and a U-Net-style decoder.

A head reads the backbone's named feature maps (`stride_4` ... `stride_32`)
and returns logits [B, h, w, num_classes] at the resolution of the map it ends
on (FCN and DeepLabV3: the deepest map, i.e. the output stride; U-Net: the
`stride_4` map). `SegmentationModel` upsamples them to the input size.

FCN and DeepLabV3 follow torchvision's `FCNHead` and `DeepLabHead` layer for
layer (`tlflax/pretrained/convert_segmentation.py` maps their state dicts);
each conv + BatchNorm pair is one `ConvBN`, so BatchNorm goes through
`layers.batch_norm` and `frozen_bn` patterns reach it (`head/aspp/conv_1/bn`).
"""
from __future__ import annotations

from typing import Any, Dict, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from tlflax.models.layers import ConvBN
from tlflax.registry import Registry

SEGMENTATION_HEADS = Registry("segmentation head")

# PyTorch's default Conv2d init (kaiming_uniform with a=sqrt(5): variance 1/(3 fan_in)),
# what torchvision's segmentation heads keep for their final 1x1 classifier.
classifier_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def resize_bilinear(x, size: Tuple[int, int]):
  """Bilinear resize of NHWC `x` to `size` (h, w): torch's `F.interpolate(mode="bilinear",
  align_corners=False)` (half-pixel centres, edge samples clamped; no antialiasing)."""
  if tuple(x.shape[1:3]) == tuple(size):
    return x
  return jax.image.resize(x, (x.shape[0], *size, x.shape[3]), "bilinear", antialias=False)


def feature_map(features: Dict[str, Any], key: str, head: nn.Module):
  """`features[key]`, or an error naming the head, the key and what the backbone has."""
  if key not in features:
    raise KeyError(f"{type(head).__name__} ({'/'.join(head.path)}) reads feature map {key!r}, "
                   f"but the backbone returns only {sorted(features)}; pick a backbone with "
                   "that map or set the head's feature names.")
  return features[key]


def _classifier(head: nn.Module, num_classes: int):
  return nn.Conv(num_classes, (1, 1), kernel_init=classifier_init, dtype=head.dtype,
                 name="classifier")


@SEGMENTATION_HEADS.register("fcn")
class FCNHead(nn.Module):
  """torchvision's FCNHead: 3x3 conv to in/4 channels + BN + ReLU, dropout, 1x1 classifier.

  Also the auxiliary head, as torchvision's FCN and DeepLabV3 (on `stride_16` for
  ResNets, `entry_stride_8` for MobileNetV3: `ModelSpec.aux_feature`).
  """
  num_classes: int
  in_feature: str = "stride_32"
  dropout: float = 0.1
  frozen_bn: Tuple[str, ...] = ()
  dtype: Any = None

  @nn.compact
  def __call__(self, features: Dict[str, Any], train: bool = False):
    x = feature_map(features, self.in_feature, self)
    x = ConvBN(x.shape[-1] // 4, 3, activation=nn.relu, frozen_bn=self.frozen_bn,
               dtype=self.dtype, name="conv")(x, train)
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    return _classifier(self, self.num_classes)(x)


class ASPP(nn.Module):
  """Atrous spatial pyramid pooling (DeepLabV3): 1x1 conv, one dilated 3x3 conv per rate
  and an image-pooling branch, concatenated and projected (1x1 conv + BN + ReLU + dropout).

  Children: `conv_0` (1x1), `conv_1` ... (the rates, in order), `pool`, `project`.
  """
  rates: Sequence[int] = (12, 24, 36)
  channels: int = 256
  dropout: float = 0.5
  frozen_bn: Tuple[str, ...] = ()
  dtype: Any = None

  @nn.compact
  def __call__(self, x, train: bool = False):
    kw = dict(activation=nn.relu, frozen_bn=self.frozen_bn, dtype=self.dtype)
    branches = [ConvBN(self.channels, 1, name="conv_0", **kw)(x, train)]
    for i, rate in enumerate(self.rates):
      branches.append(ConvBN(self.channels, 3, dilation=rate, name=f"conv_{i + 1}",
                             **kw)(x, train))
    pooled = jnp.mean(x.astype(jnp.float32), axis=(1, 2), keepdims=True).astype(x.dtype)
    pooled = ConvBN(self.channels, 1, name="pool", **kw)(pooled, train)
    # Bilinear upsampling of a 1x1 map (torchvision's) is a broadcast.
    branches.append(jnp.broadcast_to(pooled, (*x.shape[:3], self.channels)))
    y = ConvBN(self.channels, 1, name="project", **kw)(jnp.concatenate(branches, -1), train)
    return nn.Dropout(self.dropout, deterministic=not train)(y)


@SEGMENTATION_HEADS.register("deeplabv3")
class DeepLabV3Head(nn.Module):
  """torchvision's DeepLabHead: ASPP, 3x3 conv + BN + ReLU, 1x1 classifier.

  `rates` (12, 24, 36) are torchvision's, for output stride 8; the paper uses
  (6, 12, 18) at output stride 16 (`create_segmentation_model` scales them).
  """
  num_classes: int
  in_feature: str = "stride_32"
  rates: Sequence[int] = (12, 24, 36)
  channels: int = 256
  dropout: float = 0.5
  frozen_bn: Tuple[str, ...] = ()
  dtype: Any = None

  @nn.compact
  def __call__(self, features: Dict[str, Any], train: bool = False):
    x = feature_map(features, self.in_feature, self)
    kw = dict(frozen_bn=self.frozen_bn, dtype=self.dtype)
    x = ASPP(tuple(self.rates), self.channels, self.dropout, name="aspp", **kw)(x, train)
    x = ConvBN(self.channels, 3, activation=nn.relu, name="conv", **kw)(x, train)
    return _classifier(self, self.num_classes)(x)


class UpBlock(nn.Module):
  """Upsample to the skip map's size (bilinear), concatenate it, two 3x3 conv + BN + ReLU."""
  features: int
  frozen_bn: Tuple[str, ...] = ()
  dtype: Any = None

  @nn.compact
  def __call__(self, x, skip, train: bool = False):
    kw = dict(activation=nn.relu, frozen_bn=self.frozen_bn, dtype=self.dtype)
    x = resize_bilinear(x, skip.shape[1:3])
    x = jnp.concatenate([x, skip.astype(x.dtype)], axis=-1)
    x = ConvBN(self.features, 3, name="conv1", **kw)(x, train)
    return ConvBN(self.features, 3, name="conv2", **kw)(x, train)


@SEGMENTATION_HEADS.register("unet")
class UNetHead(nn.Module):
  """U-Net-style decoder on a pretrained encoder (as segmentation_models_pytorch's Unet).

  From `in_feature` (the deepest map), one `UpBlock` per entry of `skips`
  (`up_0`, `up_1`, ...) with `decoder_channels[i]` channels, then a 1x1
  classifier; logits come out at the resolution of the last skip (stride 4).
  """
  num_classes: int
  in_feature: str = "stride_32"
  skips: Sequence[str] = ("stride_16", "stride_8", "stride_4")
  decoder_channels: Sequence[int] = (256, 128, 64)
  frozen_bn: Tuple[str, ...] = ()
  dtype: Any = None

  @nn.compact
  def __call__(self, features: Dict[str, Any], train: bool = False):
    if len(self.skips) != len(self.decoder_channels):
      raise ValueError(f"UNetHead: {len(self.skips)} skips {tuple(self.skips)} but "
                       f"{len(self.decoder_channels)} decoder_channels "
                       f"{tuple(self.decoder_channels)}; give one width per skip.")
    x = feature_map(features, self.in_feature, self)
    for i, (skip, width) in enumerate(zip(self.skips, self.decoder_channels)):
      x = UpBlock(width, self.frozen_bn, self.dtype, name=f"up_{i}")(
          x, feature_map(features, skip, self), train)
    return _classifier(self, self.num_classes)(x)
