"""Backbone + global pooling + linear head: the classification model of every zoo entry.

Top-level names are always `backbone` and `head`, so freezing / learning-rate
rules read the same for every architecture (`backbone/.*`, `head/.*`).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp


class ImageClassifier(nn.Module):
  """`apply(variables, x_nhwc, train=False)` returns float32 logits."""
  backbone: nn.Module
  num_classes: int
  dropout: float = 0.0
  dtype: Any = None

  @nn.compact
  def __call__(self, x, train: bool = False):
    features = self.backbone(x, train)["stride_32"]
    x = jnp.mean(features, axis=(1, 2))
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    # torchvision initialises MobileNet/EfficientNet heads with N(0, 0.01).
    x = nn.Dense(self.num_classes, kernel_init=nn.initializers.normal(0.01),
                 dtype=self.dtype, name="head")(x)
    return x.astype(jnp.float32)
