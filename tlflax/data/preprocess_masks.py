"""Segmentation preprocessing: every geometric op moves image and mask alike.

An example is {"image": uint8 [H, W, 3], "label": integer [H, W]} (class
indices, `ignore_index` for pixels without a class). Images are resized
bilinearly (antialiased when shrinking), masks with nearest neighbour, which
only ever copies existing labels. Both use half-pixel centres, so a pixel
of the resized mask labels the image pixel at the same place.

Train: random scale (the shorter side becomes s * image_size, s uniform in
`scale_range`), normalise, pad to at least image_size on each side (bottom
and right; the image with 0, which is the mean colour after normalisation,
the mask with `ignore_index`, so padding counts in no loss or metric), a
random image_size x image_size crop, then a random horizontal flip of both.
Random ops are stateless and take their seed as an argument, as in
`preprocess.py`, so a resumed run rebuilds its batches bit for bit.

Eval: image and mask resized to image_size x image_size (aspect ratio not
kept), so shapes are static for jit. Eval metrics (mIoU, ...) are therefore
measured at that resolution, not at each image's original size.
"""
from __future__ import annotations

from typing import Callable, Sequence

import ml_collections
import tensorflow as tf

from tlflax.data.preprocess import normalize, resize


def resize_mask(mask: tf.Tensor, height, width) -> tf.Tensor:
  """Nearest-neighbour resize of an [H, W] label map (keeps its dtype)."""
  resized = tf.image.resize(mask[..., None], tf.stack([height, width]),
                            method="nearest")
  return resized[..., 0]


def random_scale(image: tf.Tensor, mask: tf.Tensor, seed: tf.Tensor,
                 base_size: int, scale_range: Sequence[float]):
  """Resizes both so the shorter side is s * base_size, s ~ U(scale_range)."""
  low, high = (float(v) for v in scale_range)
  scale = tf.random.stateless_uniform([], seed, minval=low, maxval=high)
  shape = tf.cast(tf.shape(mask)[:2], tf.float32)
  factor = scale * base_size / tf.reduce_min(shape)
  new = tf.maximum(tf.cast(tf.round(shape * factor), tf.int32), 1)
  return resize(image, new[0], new[1]), resize_mask(mask, new[0], new[1])


def pad_to_size(image: tf.Tensor, mask: tf.Tensor, size: int,
                ignore_index: int):
  """Pads bottom/right up to size: image with 0, mask with ignore_index."""
  shape = tf.shape(mask)
  pad_h = tf.maximum(size - shape[0], 0)
  pad_w = tf.maximum(size - shape[1], 0)
  image = tf.pad(image, [[0, pad_h], [0, pad_w], [0, 0]])
  mask = tf.pad(mask, [[0, pad_h], [0, pad_w]], constant_values=ignore_index)
  return image, mask


def random_crop(image: tf.Tensor, mask: tf.Tensor, seed: tf.Tensor,
                size: int):
  """The same random size x size window of both (sides must be >= size)."""
  shape = tf.shape(mask)
  room = tf.cast(shape[:2] - size + 1, tf.float32)  # Top/left choices.
  unit = tf.random.stateless_uniform([2], seed)
  top_left = tf.minimum(tf.cast(unit * room, tf.int32), shape[:2] - size)
  top, left = top_left[0], top_left[1]
  image = tf.ensure_shape(image[top:top + size, left:left + size],
                          [size, size, 3])
  mask = tf.ensure_shape(mask[top:top + size, left:left + size], [size, size])
  return image, mask


def random_flip(image: tf.Tensor, mask: tf.Tensor, seed: tf.Tensor):
  """Mirrors both left-right with probability 1/2 (one draw for the pair)."""
  flip = tf.random.stateless_uniform([], seed) < 0.5
  image = tf.where(flip, tf.reverse(image, [1]), image)
  mask = tf.where(flip, tf.reverse(mask, [1]), mask)
  return image, mask


def eval_image(image: tf.Tensor, size: int, mean: Sequence[float],
               std: Sequence[float]) -> tf.Tensor:
  """uint8 [H, W, 3] -> normalised float32 [size, size, 3], as at eval."""
  image = tf.ensure_shape(resize(image, size, size), [size, size, 3])
  return normalize(image, mean, std)


def check_scale_range(scale_range: Sequence[float]) -> None:
  if len(scale_range) != 2 or not 0 < scale_range[0] <= scale_range[1]:
    raise ValueError(f"config.scale_range={tuple(scale_range)} must be "
                     "(low, high) with 0 < low <= high, e.g. (0.5, 2.0).")


def train_transform(config: ml_collections.ConfigDict, mean, std
                    ) -> Callable[[dict, tf.Tensor], dict]:
  """(example, seed [2]) -> {"image": f32 [S, S, 3], "label": int32 [S, S]}."""
  check_scale_range(config.scale_range)
  size, ignore_index = config.image_size, int(config.ignore_index)
  scale_range, flip = tuple(config.scale_range), config.flip

  def transform(example, seed):
    scale_seed, crop_seed, flip_seed = tf.unstack(
        tf.random.experimental.stateless_split(seed, 3))
    mask = tf.cast(example["label"], tf.int32)
    image, mask = random_scale(example["image"], mask, scale_seed, size,
                               scale_range)
    image = normalize(image, mean, std)
    image, mask = pad_to_size(image, mask, size, ignore_index)
    image, mask = random_crop(image, mask, crop_seed, size)
    if flip:
      image, mask = random_flip(image, mask, flip_seed)
    return {"image": image, "label": mask}

  return transform


def eval_transform(config: ml_collections.ConfigDict, mean, std
                   ) -> Callable[[dict], dict]:
  """example -> {"image": float32 [S, S, 3], "label": int32 [S, S]}."""
  size = config.image_size

  def transform(example):
    mask = resize_mask(tf.cast(example["label"], tf.int32), size, size)
    return {"image": eval_image(example["image"], size, mean, std),
            "label": tf.ensure_shape(mask, [size, size])}

  return transform
