"""Backbone + pre-logits + linear head: the classification model of every zoo entry.

Top-level names are always `backbone`, `pre_logits` (only where the
architecture has layers between the last feature map and the classifier, e.g.
VGG's fc6/fc7) and `head` (the final linear layer), so freezing / learning-rate
rules read the same for every architecture (`backbone/.*`, `head/.*`) and a
linear probe trains exactly the layer torchvision's tutorials replace.
"""
from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax.numpy as jnp


class ImageClassifier(nn.Module):
  """`apply(variables, x_nhwc, train=False)` returns float32 logits."""
  backbone: nn.Module
  num_classes: int
  dropout: float = 0.0
  pre_logits: Optional[nn.Module] = None  # (stride_32 map, train) -> (N, D); None: mean pool.
  dtype: Any = None

  @nn.compact
  def __call__(self, x, train: bool = False):
    features = self.backbone(x, train)["stride_32"]
    if self.pre_logits is None:
      x = jnp.mean(features, axis=(1, 2))
    else:
      x = self.pre_logits(features, train)
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    # torchvision initialises MobileNet/EfficientNet heads with N(0, 0.01).
    x = nn.Dense(self.num_classes, kernel_init=nn.initializers.normal(0.01),
                 dtype=self.dtype, name="head")(x)
    return x.astype(jnp.float32)
