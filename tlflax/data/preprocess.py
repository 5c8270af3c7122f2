"""Image preprocessing: pure tf functions on one example.

Random ops are stateless and take their seed as an argument; the pipeline
derives it from (seed, epoch, example index), so a batch can be rebuilt bit
for bit (same seed, resumed run, other process count). All resizing is
bilinear with antialiasing, which only changes anything when shrinking.
"""
from __future__ import annotations

from typing import Callable, List, Sequence

import ml_collections
import tensorflow as tf

from tlflax.data import augment

# resize_random_crop: BiT's recipe, a square resize to resize_size, then a random
# image_size x image_size window (data.resize_size must be set, >= image_size).
TRAIN_CROPS = ("random_resized_crop", "resize", "resize_random_crop")
# Seed purposes of the augmentations after crop and flip (folded into the
# example's seed; crop and flip keep their split, so with every augmentation
# off the images are those of before augmentations existed).
_ROTATION, _RANDAUGMENT, _COLOR_JITTER = 1, 2, 3
EVAL_CROPS = ("center_crop", "resize")
CENTER_CROP_FRACTION = 0.875  # 224 of 256, the usual ImageNet eval ratio.


def decode_image(data: tf.Tensor) -> tf.Tensor:
  """Encoded bytes -> uint8 [H, W, 3]; grey/RGBA become RGB, GIFs frame 0."""
  image = tf.io.decode_image(data, channels=3, expand_animations=False,
                             dtype=tf.uint8)
  image.set_shape([None, None, 3])
  return image


def resize(image: tf.Tensor, height, width) -> tf.Tensor:
  """Bilinear, antialiased resize to [height, width]; returns float32."""
  return tf.image.resize(image, tf.stack([height, width]), method="bilinear",
                         antialias=True)


def random_resized_crop(image: tf.Tensor, seed: tf.Tensor, size: int,
                        scale: Sequence[float] = (0.08, 1.0),
                        ratio: Sequence[float] = (3 / 4, 4 / 3)) -> tf.Tensor:
  """Inception-style crop: random area/aspect box, resized to size x size.

  Falls back to the whole image when no box fits within 10 attempts.
  """
  begin, crop_size, _ = tf.image.stateless_sample_distorted_bounding_box(
      tf.shape(image), bounding_boxes=tf.zeros([0, 0, 4]), seed=seed,
      min_object_covered=0.0, aspect_ratio_range=tuple(ratio),
      area_range=tuple(scale), max_attempts=10,
      use_image_if_no_bounding_boxes=True)
  crop = tf.slice(image, begin, crop_size)
  return tf.ensure_shape(resize(crop, size, size), [size, size, 3])


def resize_shorter_side(image: tf.Tensor, size: int) -> tf.Tensor:
  """Resizes so the shorter side is `size`, keeping the aspect ratio."""
  shape = tf.cast(tf.shape(image)[:2], tf.float32)
  scale = size / tf.reduce_min(shape)
  new = tf.maximum(tf.cast(tf.round(shape * scale), tf.int32), size)
  return resize(image, new[0], new[1])


def center_crop(image: tf.Tensor, size: int) -> tf.Tensor:
  """The central size x size window (image sides must be >= size)."""
  shape = tf.shape(image)
  top = (shape[0] - size) // 2
  left = (shape[1] - size) // 2
  crop = tf.image.crop_to_bounding_box(image, top, left, size, size)
  return tf.ensure_shape(crop, [size, size, 3])


def eval_resize_size(image_size: int, resize_size=None) -> int:
  """Shorter side before the eval center crop: default image_size / 0.875."""
  if resize_size is None:
    return int(round(image_size / CENTER_CROP_FRACTION))
  if resize_size < image_size:
    raise ValueError(f"resize_size={resize_size} is smaller than "
                     f"image_size={image_size}; the center crop would not fit.")
  return int(resize_size)


def normalize(image: tf.Tensor, mean: Sequence[float],
              std: Sequence[float]) -> tf.Tensor:
  """(x / 255 - mean) / std in float32; mean/std are per channel in [0, 1]."""
  image = tf.cast(image, tf.float32) / 255.0
  return (image - tf.constant(mean, tf.float32)) / tf.constant(std, tf.float32)


def _check_option(name: str, value: str, options: Sequence[str]) -> None:
  if value not in options:
    raise ValueError(f"config.{name}={value!r} is not one of {list(options)}.")


def _check_augment(config: ml_collections.ConfigDict) -> None:
  """Errors that name the field and its valid range."""
  if not 0 <= config.rotation <= 180:
    raise ValueError(f"config.rotation={config.rotation} must be in [0, 180] "
                     "(max degrees of the random rotation; 0 = off).")
  jitter = tuple(config.color_jitter)
  if len(jitter) != 4 or min(jitter) < 0:
    raise ValueError(f"config.color_jitter={jitter} must be 4 numbers >= 0: "
                     "(brightness, contrast, saturation, hue); 0 = off.")
  if jitter[3] > 0.5:
    raise ValueError(f"config.color_jitter hue={jitter[3]} must be <= 0.5 "
                     "(a hue shift of half a turn either way).")
  if config.randaugment_layers < 0:
    raise ValueError(f"config.randaugment_layers={config.randaugment_layers}"
                     " must be >= 0 (ops per image; 0 = off).")
  if not 0 <= config.randaugment_magnitude <= augment.MAX_MAGNITUDE:
    raise ValueError(f"config.randaugment_magnitude="
                     f"{config.randaugment_magnitude} must be in [0, 10].")


def augmentations(config: ml_collections.ConfigDict, mean
                  ) -> List[Callable[[tf.Tensor, tf.Tensor], tf.Tensor]]:
  """The enabled ops after the crop and flip, in order: rotation (geometry
  first, so RandAugment's colour ops see the final pixels), RandAugment, then
  colour jitter (as timm orders its auto-augment and jitter). Off ops are
  not in the list, so they add nothing to the graph. Geometric ops fill with
  the normalisation mean, which normalises to 0 (as zero padding would)."""
  _check_augment(config)
  fill = tuple(255.0 * float(m) for m in mean)
  fold = tf.random.experimental.stateless_fold_in
  ops = []
  if config.rotation:
    ops.append(lambda image, seed: augment.random_rotation(
        image, fold(seed, _ROTATION), float(config.rotation), fill))
  if config.randaugment_layers:
    ops.append(lambda image, seed: augment.randaugment(
        image, fold(seed, _RANDAUGMENT), int(config.randaugment_layers),
        float(config.randaugment_magnitude), fill))
  if any(config.color_jitter):
    ops.append(lambda image, seed: augment.color_jitter(
        image, fold(seed, _COLOR_JITTER), tuple(config.color_jitter),
        bool(config.color_jitter_random_order)))
  return ops


def train_transform(config: ml_collections.ConfigDict, mean, std
                    ) -> Callable[[dict, tf.Tensor], dict]:
  """(example, seed [2]) -> {"image": float32 [S, S, 3], "label": int32}."""
  _check_option("train_crop", config.train_crop, TRAIN_CROPS)
  size = config.image_size
  ops = augmentations(config, mean)
  precrop = config.get("resize_size")
  if config.train_crop == "resize_random_crop" and (precrop is None or precrop < size):
    raise ValueError(f"data.train_crop='resize_random_crop' needs data.resize_size >= "
                     f"data.image_size={size} (the square resize before the crop); got "
                     f"{precrop}.")

  def transform(example, seed):
    crop_seed, flip_seed = tf.unstack(
        tf.random.experimental.stateless_split(seed, 2))
    image = example["image"]
    if config.train_crop == "random_resized_crop":
      image = random_resized_crop(image, crop_seed, size, config.crop_scale,
                                  config.crop_ratio)
    elif config.train_crop == "resize_random_crop":
      image = tf.image.stateless_random_crop(
          resize(image, precrop, precrop), [size, size, 3], crop_seed)
    else:
      image = tf.ensure_shape(resize(image, size, size), [size, size, 3])
    if config.flip:
      image = tf.image.stateless_random_flip_left_right(image, flip_seed)
    for op in ops:
      image = op(image, seed)
    return {"image": normalize(image, mean, std),
            "label": tf.cast(example["label"], tf.int32)}

  return transform


def eval_transform(config: ml_collections.ConfigDict, mean, std
                   ) -> Callable[[dict], dict]:
  """example -> {"image": float32 [S, S, 3], "label": int32}; deterministic."""
  _check_option("eval_crop", config.eval_crop, EVAL_CROPS)
  size = config.image_size
  resize_size = eval_resize_size(size, config.resize_size)

  def transform(example):
    image = example["image"]
    if config.eval_crop == "center_crop":
      image = center_crop(resize_shorter_side(image, resize_size), size)
    else:
      image = tf.ensure_shape(resize(image, size, size), [size, size, 3])
    return {"image": normalize(image, mean, std),
            "label": tf.cast(example["label"], tf.int32)}

  return transform
