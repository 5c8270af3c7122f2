"""Backbone + segmentation head (+ optional auxiliary head): the segmentation model.

It lives beside `classifier.py` because it is the same kind of thing: the
top-level composition that fixes the names rules and checkpoints see
(`backbone`, `head`, `aux_head`), whatever the decoder; the decoders
themselves are in `tlflax.heads`.
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import flax.linen as nn
import jax.numpy as jnp

from tlflax.heads.segmentation import SEGMENTATION_HEADS, FCNHead, resize_bilinear
from tlflax.models.spec import ModelSpec

# Variables a classification checkpoint gives a segmentation model: its backbone only.
BACKBONE_VARIABLES = r"(params|batch_stats)/backbone/.*"

# DeepLabV3's ASPP rates at output stride 16 (the paper); they scale with 16 / stride,
# so stride 8 gives torchvision's (12, 24, 36).
DEEPLAB_RATES_AT_16 = (6, 12, 18)


class SegmentationModel(nn.Module):
  """`apply(variables, x_nhwc, train=False)` -> {"out": logits, "aux": logits}.

  Logits are float32 [B, H, W, num_classes] at the input resolution, upsampled
  bilinearly from the head's resolution as torchvision's segmentation models
  (`F.interpolate(mode="bilinear", align_corners=False)`). "aux" is there only
  with an auxiliary head (as torchvision, also at eval); it is for the loss.
  """
  backbone: nn.Module
  head: nn.Module
  aux_head: Optional[nn.Module] = None

  @nn.compact
  def __call__(self, x, train: bool = False) -> Dict[str, Any]:
    features = self.backbone(x, train)
    size = x.shape[1:3]
    outputs = {"out": _upsample(self.head(features, train), size)}
    if self.aux_head is not None:
      outputs["aux"] = _upsample(self.aux_head(features, train), size)
    return outputs


def _upsample(logits, size):
  return resize_bilinear(logits.astype(jnp.float32), size)


def deeplab_rates(output_stride: Optional[int]) -> Tuple[int, ...]:
  """ASPP rates for an output stride: (6, 12, 18) at 16, (12, 24, 36) at 8, (3, 6, 9) at 32."""
  stride = output_stride or 32
  return tuple(max(1, r * 16 // stride) for r in DEEPLAB_RATES_AT_16)


def backbone_options(name: str, spec: ModelSpec, output_stride: Optional[int],
                     backbone_kwargs: Mapping[str, Any]) -> Dict[str, Any]:
  """Backbone kwargs with the dilation that gives `output_stride` (None: the native 32)."""
  if output_stride is None:
    return dict(backbone_kwargs)
  if spec.output_stride is None:
    if output_stride == 32:
      return dict(backbone_kwargs)
    raise ValueError(f"Backbone {name!r} cannot dilate its last stages, so output_stride="
                     f"{output_stride} is not available; use output_stride=None (32) or a "
                     "dilatable backbone (resnet*, mobilenet_v2, mobilenet_v3_*).")
  return {**spec.output_stride(output_stride), **backbone_kwargs}


def build_segmentation_model(head: str, backbone: nn.Module, *, num_classes: int,
                             output_stride: Optional[int] = None, aux: bool = False,
                             aux_feature: str = "stride_16", dtype: Any = None,
                             frozen_bn: Sequence[str] = (),
                             head_kwargs: Optional[Mapping[str, Any]] = None
                             ) -> SegmentationModel:
  """The module for a registered head name ("fcn", "deeplabv3", "unet") on `backbone`.

  DeepLabV3's rates default to the paper's rule for `output_stride`
  (`deeplab_rates`); `head_kwargs` override any head field. The aux head is
  torchvision's: an FCNHead, on `aux_feature` (torchvision's map for ResNets;
  `ModelSpec.aux_feature` names each backbone's).
  """
  kw = dict(num_classes=num_classes, dtype=dtype, frozen_bn=tuple(frozen_bn))
  defaults = {"rates": deeplab_rates(output_stride)} if head == "deeplabv3" else {}
  head_module = SEGMENTATION_HEADS.get(head)(**kw, **{**defaults, **(head_kwargs or {})})
  aux_head = FCNHead(in_feature=aux_feature, **kw) if aux else None
  return SegmentationModel(backbone=backbone, head=head_module, aux_head=aux_head)
