"""Classification augmentations: rotation, colour jitter, RandAugment.

Pure tf functions on one [H, W, 3] image, uint8 or float in [0, 255]; they
return float32 in [0, 255], so they sit between the crop (which already
returns float32) and `preprocess.normalize`. Values are not rounded to uint8
between ops (unlike PIL pipelines): that is more precise, and the ops whose
definition needs integers (equalize, posterize) round first themselves.

Random ops are stateless: each takes a [2] seed and derives one sub-seed per
random choice with `stateless_fold_in` / `stateless_split`, so the pipeline's
(seed, epoch, example index) seed rebuilds an augmented image bit for bit.

Geometry follows PIL's continuous pixel coordinates (pixel centres at
i + 0.5): rotation turns counter-clockwise as displayed about the image
centre, shears keep the top-left corner of the image fixed (as PIL's affine
in timm and the paper's TF code do), all with bilinear sampling; pixels that
come from outside the image get `fill` (per channel, in [0, 255] units).
"""
from __future__ import annotations

import functools
import math
from typing import Callable, List, Sequence, Tuple

import tensorflow as tf

MAX_MAGNITUDE = 10.0
GREY_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R 601-2 luma, as PIL's "L".
SHARPEN_KERNEL = ((1, 1, 1), (1, 5, 1), (1, 1, 1))  # PIL's SMOOTH, / 13.
DEFAULT_FILL = (128.0, 128.0, 128.0)
COLOR_JITTER = ("brightness", "contrast", "saturation", "hue")


def to_float(image: tf.Tensor) -> tf.Tensor:
  """float32 in [0, 255]; uint8 and float inputs share one scale."""
  return tf.cast(image, tf.float32)


def _clip(image: tf.Tensor) -> tf.Tensor:
  return tf.clip_by_value(image, 0.0, 255.0)


def _sub_seed(seed: tf.Tensor, purpose: int) -> tf.Tensor:
  """An independent stream per random choice, stable if others are added."""
  return tf.random.experimental.stateless_fold_in(seed, purpose)


# ------------------------------------------------------------------ geometry


def affine(image: tf.Tensor, matrix: Sequence, fill=DEFAULT_FILL) -> tf.Tensor:
  """Samples input point A @ (p_out) + t for each output point, bilinearly.

  `matrix` = (a0, a1, a2, b0, b1, b2) in continuous coordinates (PIL's
  `Image.transform(..., AFFINE, matrix)` convention). TF's op works on pixel
  indices, hence the half-pixel shift; it fills with one scalar, hence the
  per-channel fill is subtracted first and added back (bilinear is linear, so
  border pixels blend with `fill` exactly as with a coloured border).
  """
  a0, a1, a2, b0, b1, b2 = [tf.cast(v, tf.float32) for v in matrix]
  a2 = a2 + 0.5 * (a0 + a1) - 0.5
  b2 = b2 + 0.5 * (b0 + b1) - 0.5
  zero = tf.zeros([], tf.float32)
  transform = tf.stack([a0, a1, a2, b0, b1, b2, zero, zero])[None]
  fill = tf.constant(fill, tf.float32)
  image = to_float(image)
  out = tf.raw_ops.ImageProjectiveTransformV3(
      images=(image - fill)[None], transforms=transform,
      output_shape=tf.shape(image)[:2], fill_value=0.0,
      interpolation="BILINEAR", fill_mode="CONSTANT")[0]
  return tf.ensure_shape(out + fill, image.shape)


def rotate(image: tf.Tensor, degrees, fill=DEFAULT_FILL) -> tf.Tensor:
  """Counter-clockwise (as displayed) about the centre, same size (PIL's)."""
  theta = tf.cast(degrees, tf.float32) * (math.pi / 180.0)
  c, s = tf.cos(theta), tf.sin(theta)
  size = tf.cast(tf.shape(image)[:2], tf.float32)
  cy, cx = size[0] / 2.0, size[1] / 2.0
  # Input = R(-theta) (out - centre) + centre, y pointing down.
  return affine(image, (c, -s, cx - c * cx + s * cy,
                        s, c, cy - s * cx - c * cy), fill)


def shear_x(image: tf.Tensor, factor, fill=DEFAULT_FILL) -> tf.Tensor:
  """Output (x, y) reads input (x + factor * y, y)."""
  return affine(image, (1.0, factor, 0.0, 0.0, 1.0, 0.0), fill)


def shear_y(image: tf.Tensor, factor, fill=DEFAULT_FILL) -> tf.Tensor:
  """Output (x, y) reads input (x, y + factor * x)."""
  return affine(image, (1.0, 0.0, 0.0, factor, 1.0, 0.0), fill)


def translate_x(image: tf.Tensor, pixels, fill=DEFAULT_FILL) -> tf.Tensor:
  """Output (x, y) reads input (x + pixels, y): content moves left."""
  return affine(image, (1.0, 0.0, pixels, 0.0, 1.0, 0.0), fill)


def translate_y(image: tf.Tensor, pixels, fill=DEFAULT_FILL) -> tf.Tensor:
  """Output (x, y) reads input (x, y + pixels): content moves up."""
  return affine(image, (1.0, 0.0, 0.0, 0.0, 1.0, pixels), fill)


def random_rotation(image: tf.Tensor, seed: tf.Tensor, max_degrees: float,
                    fill=DEFAULT_FILL) -> tf.Tensor:
  """A uniform angle in [-max_degrees, max_degrees] (torchvision's)."""
  angle = tf.random.stateless_uniform([], seed, -max_degrees, max_degrees)
  return rotate(image, angle, fill)


# ------------------------------------------------------------------ colour


def grey(image: tf.Tensor) -> tf.Tensor:
  """Luma [H, W, 1] with PIL's weights (torchvision: 0.2989, no matter)."""
  return tf.reduce_sum(to_float(image) * tf.constant(GREY_WEIGHTS), -1,
                       keepdims=True)


def blend(degenerate: tf.Tensor, image: tf.Tensor, factor) -> tf.Tensor:
  """degenerate + factor * (image - degenerate), clipped: PIL ImageEnhance
  and torchvision's adjust_* are all this with different degenerates."""
  factor = tf.cast(factor, tf.float32)
  return _clip(degenerate + factor * (to_float(image) - degenerate))


def brightness(image: tf.Tensor, factor) -> tf.Tensor:
  """Blend with black."""
  return blend(tf.zeros([], tf.float32), image, factor)


def contrast(image: tf.Tensor, factor) -> tf.Tensor:
  """Blend with the mean grey level (a float mean; PIL rounds it)."""
  return blend(tf.reduce_mean(grey(image)), image, factor)


def saturation(image: tf.Tensor, factor) -> tf.Tensor:
  """Blend with the grey image; RandAugment's "color" (ImageEnhance.Color)."""
  return blend(grey(image), image, factor)


def hue(image: tf.Tensor, delta) -> tf.Tensor:
  """Rotates hue by delta turns in [-0.5, 0.5] (HSV round trip)."""
  out = tf.image.adjust_hue(to_float(image) / 255.0, delta)
  return _clip(out * 255.0)


def sharpness(image: tf.Tensor, factor) -> tf.Tensor:
  """Blend with PIL's SMOOTH 3x3 filter; the 1-pixel border stays as is."""
  image = to_float(image)
  kernel = tf.constant(SHARPEN_KERNEL, tf.float32) / 13.0
  kernel = tf.tile(kernel[:, :, None, None], [1, 1, 3, 1])
  smooth = tf.nn.depthwise_conv2d(image[None], kernel, [1, 1, 1, 1],
                                  "VALID")[0]
  pad = [[1, 1], [1, 1], [0, 0]]
  inner = tf.pad(tf.ones_like(smooth[..., :1]), pad)
  degenerate = inner * tf.pad(smooth, pad) + (1.0 - inner) * image
  return blend(degenerate, image, factor)


def autocontrast(image: tf.Tensor) -> tf.Tensor:
  """Per channel, stretches [min, max] to [0, 255]; flat channels unchanged."""
  image = to_float(image)
  lo = tf.reduce_min(image, axis=[0, 1])
  hi = tf.reduce_max(image, axis=[0, 1])
  scale = tf.where(hi > lo, 255.0 / tf.maximum(hi - lo, 1e-6), 1.0)
  offset = tf.where(hi > lo, lo, 0.0)
  return _clip((image - offset) * scale)


def equalize(image: tf.Tensor) -> tf.Tensor:
  """Per channel histogram equalisation with PIL's ImageOps.equalize LUT."""
  values = tf.cast(tf.round(_clip(to_float(image))), tf.int32)
  channels = [_equalize_channel(values[..., c]) for c in range(3)]
  return tf.cast(tf.stack(channels, -1), tf.float32)


def _equalize_channel(values: tf.Tensor) -> tf.Tensor:
  """LUT[i] = (pixels below i + step // 2) // step, step = the pixels not of
  the top value // 255; identity when step is 0 (one or two values)."""
  hist = tf.math.bincount(tf.reshape(values, [-1]), minlength=256,
                          maxlength=256)
  top = tf.reduce_max(tf.where(hist > 0, tf.range(256), 0))
  step = (tf.reduce_sum(hist) - hist[top]) // 255
  below = tf.cumsum(hist, exclusive=True)
  lut = tf.minimum((below + step // 2) // tf.maximum(step, 1), 255)
  return tf.where(step > 0, tf.gather(lut, values), values)


def solarize(image: tf.Tensor, threshold) -> tf.Tensor:
  """Inverts values >= threshold (threshold 256: nothing, 0: everything)."""
  image = to_float(image)
  return tf.where(image < tf.cast(threshold, tf.float32), image, 255.0 - image)


def posterize(image: tf.Tensor, bits: int) -> tf.Tensor:
  """Keeps the top `bits` bits of each (rounded) value."""
  step = 2.0 ** (8 - int(bits))
  return tf.floor(tf.round(_clip(to_float(image))) / step) * step


# ------------------------------------------------------------------ RandAugment


def _side(image: tf.Tensor, axis: int) -> tf.Tensor:
  return tf.cast(tf.shape(image)[axis], tf.float32)


# The paper's 14 transforms (Cubuk et al. 2020, section 3), in its order:
# name -> f(image, m = magnitude / 10, sign, fill).
_RANDAUGMENT = {
    "identity": lambda x, m, s, f: to_float(x),
    "autocontrast": lambda x, m, s, f: autocontrast(x),
    "equalize": lambda x, m, s, f: equalize(x),
    "rotate": lambda x, m, s, f: rotate(x, s * 30.0 * m, f),
    "solarize": lambda x, m, s, f: solarize(x, 256.0 * (1.0 - m)),
    "color": lambda x, m, s, f: saturation(x, 1.0 + s * 0.9 * m),
    "posterize": lambda x, m, s, f: posterize(x, 8 - int(4 * m)),
    "contrast": lambda x, m, s, f: contrast(x, 1.0 + s * 0.9 * m),
    "brightness": lambda x, m, s, f: brightness(x, 1.0 + s * 0.9 * m),
    "sharpness": lambda x, m, s, f: sharpness(x, 1.0 + s * 0.9 * m),
    "shear_x": lambda x, m, s, f: shear_x(x, s * 0.3 * m, f),
    "shear_y": lambda x, m, s, f: shear_y(x, s * 0.3 * m, f),
    "translate_x": lambda x, m, s, f: translate_x(
        x, s * 0.45 * m * _side(x, 1), f),
    "translate_y": lambda x, m, s, f: translate_y(
        x, s * 0.45 * m * _side(x, 0), f),
}
RANDAUGMENT_OPS = tuple(_RANDAUGMENT)


def randaugment_op(name: str, image: tf.Tensor, magnitude: float, sign,
                   fill=DEFAULT_FILL) -> tf.Tensor:
  """One RandAugment transform at `magnitude` in [0, 10], severity growing.

  m = magnitude / 10. Signed (sign = +-1): rotate 30 m degrees, shear 0.3 m,
  translate 0.45 m of the side, color/contrast/brightness/sharpness factor
  1 + 0.9 m (timm's "increasing" ranges). Unsigned: solarize threshold
  256 (1 - m); posterize to 8 - int(4 m) bits, the paper's 4-8 bit range
  (timm's "increasing" posterize goes down to 0 bits, a black image).
  identity, autocontrast and equalize have no magnitude.
  """
  if name not in _RANDAUGMENT:
    raise ValueError(f"unknown RandAugment op {name!r}; one of "
                     f"{list(RANDAUGMENT_OPS)}.")
  m = float(magnitude) / MAX_MAGNITUDE
  return _RANDAUGMENT[name](image, m, tf.cast(sign, tf.float32), fill)


def randaugment(image: tf.Tensor, seed: tf.Tensor, num_layers: int,
                magnitude: float, fill=DEFAULT_FILL) -> tf.Tensor:
  """`num_layers` ops, each drawn uniformly from the 14 (repeats allowed) and
  always applied, with a random sign for the signed ones (the paper's
  RandAugment; timm adds a per-op probability, here it is the identity op)."""
  image = to_float(image)
  shape = image.shape
  for layer_seed in tf.unstack(
      tf.random.experimental.stateless_split(seed, num_layers)):
    index = tf.random.stateless_uniform(
        [], _sub_seed(layer_seed, 0), 0, len(RANDAUGMENT_OPS), tf.int32)
    negative = tf.random.stateless_uniform([], _sub_seed(layer_seed, 1)) < 0.5
    sign = tf.where(negative, -1.0, 1.0)
    branches = [functools.partial(randaugment_op, name, image, magnitude,
                                  sign, fill) for name in RANDAUGMENT_OPS]
    image = tf.ensure_shape(tf.switch_case(index, branches), shape)
  return image


# ------------------------------------------------------------------ colour jitter


def jitter_ranges(amounts: Sequence[float]
                  ) -> List[Tuple[int, Callable, float, float]]:
  """(slot, op, low, high) of the enabled jitters, torchvision's ranges:
  factor in [max(0, 1 - x), 1 + x] for brightness, contrast and saturation,
  hue delta in [-x, x]. The slot (0-3) keys the op's seed, so enabling one
  jitter does not change the factors drawn for the others."""
  if len(amounts) != len(COLOR_JITTER):
    raise ValueError(f"color jitter needs 4 amounts {COLOR_JITTER}, got "
                     f"{tuple(amounts)}.")
  ops = (brightness, contrast, saturation, hue)
  ranges = []
  for slot, (op, x) in enumerate(zip(ops, amounts)):
    if x:
      low, high = (-x, x) if op is hue else (max(0.0, 1.0 - x), 1.0 + x)
      ranges.append((slot, op, float(low), float(high)))
  return ranges


def _jitter_step(op: Callable, factor: tf.Tensor) -> Callable:
  return lambda image: op(image, factor)


def color_jitter(image: tf.Tensor, seed: tf.Tensor, amounts: Sequence[float],
                 random_order: bool = True) -> tf.Tensor:
  """torchvision's ColorJitter with amounts (brightness, contrast, saturation,
  hue): one random factor per enabled op, applied in a random order (or in
  that order). Disabled ops (amount 0) are left out of the graph."""
  image = to_float(image)
  steps = [_jitter_step(op, tf.random.stateless_uniform(
      [], _sub_seed(seed, slot), low, high))
           for slot, op, low, high in jitter_ranges(amounts)]
  if not random_order or len(steps) < 2:
    for step in steps:
      image = step(image)
    return image
  order = tf.argsort(tf.random.stateless_uniform([len(steps)],
                                                 _sub_seed(seed, 4)))
  shape = image.shape
  for position in range(len(steps)):
    branches = [functools.partial(step, image) for step in steps]
    image = tf.ensure_shape(tf.switch_case(order[position], branches), shape)
  return image
