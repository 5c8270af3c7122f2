"""Detection preprocessing: every geometric op moves image and boxes alike.

An example is {"image": uint8 [H, W, 3], "boxes": float32 [K, 4] (x1, y1, x2,
y2) in original pixels (continuous, 0-based: pixel (i, j) covers [j, j+1) x
[i, i+1)), "classes": int32 [K], "image_id": int32}, optionally "crowd" bool
[K] (COCO iscrowd, VOC difficult: left out of the batches, see below).

Resizing scales both axes by exactly one factor s with
`tf.raw_ops.ScaleAndTranslate` (the op behind `tf.image.resize` with
antialias, triangle kernel), so the content at original x sits at s * x and a
box times s covers the same pixels. The output keeps the round(H s) x
round(W s) pixels whose centres fall inside the image (a rounded resize would
scale each axis by its own factor, up to half a pixel off at the far edge).

Eval (deterministic): s = image_size / max(H, W), so the longer side fills
image_size; normalise; pad bottom/right with 0 (the mean colour after
normalisation) to image_size x image_size. Batches carry s as "scale" and
(H, W) as "orig_size", so original = network / scale.

Train: s = image_size / max(H, W) * u, u ~ U(box_scale_range) (scale
jitter); a random horizontal flip of the scaled image (x -> w - x, w its
pixel width: the flip happens before padding so padding stays bottom/right);
a random image_size x image_size window where the image is larger (a random
offset per axis), zero padding bottom/right where it is smaller. Boxes are
shifted by the window offset and clipped to the image content inside the
window. A clipped box is dropped when its width or height is below
`min_box_size` pixels or when less than MIN_VISIBLE_FRACTION (30%) of its
area before clipping is left: a sliver of an object at the crop edge would
teach the model to fire on fragments. Random ops are stateless and take their
seed as an argument, as in `preprocess.py`, so a resumed run rebuilds its
batches bit for bit.

Both: boxes with zero width or height (or narrower than `min_box_size`) are
dropped, crowd boxes are left out (they are no training target; COCOeval
reads them from `detection.coco_ground_truth` and ignores detections on
them), then boxes are trimmed to the first `max_boxes` and padded to exactly
`max_boxes` rows (boxes 0, classes -1), so every batch has static shapes.
"""
from __future__ import annotations

from typing import Callable, Sequence

import ml_collections
import tensorflow as tf

from tlflax.data.preprocess import normalize

MIN_VISIBLE_FRACTION = 0.3  # Of a box's area, after cropping, to keep it.


def fit_scale(image: tf.Tensor, size: int) -> tf.Tensor:
  """The factor that makes the image's longer side `size` (float32 scalar)."""
  longer = tf.reduce_max(tf.shape(image)[:2])
  return tf.cast(size, tf.float32) / tf.cast(longer, tf.float32)


def scaled_size(height_width: tf.Tensor, scale: tf.Tensor) -> tf.Tensor:
  """[h, w] int32: the pixels whose centres fall inside the scaled image."""
  hw = tf.cast(height_width, tf.float32) * scale
  return tf.maximum(tf.cast(tf.floor(hw + 0.5), tf.int32), 1)


def scale_image(image: tf.Tensor, scale: tf.Tensor) -> tf.Tensor:
  """Resizes by exactly `scale` on both axes; float32 [h, w, 3] (see module)."""
  size = scaled_size(tf.shape(image)[:2], scale)
  scale = tf.cast(scale, tf.float32)
  resized = tf.raw_ops.ScaleAndTranslate(
      images=tf.cast(image, tf.float32)[None], size=size,
      scale=tf.stack([scale, scale]), translation=tf.zeros([2]),
      kernel_type="triangle", antialias=True)
  return tf.ensure_shape(resized[0], [None, None, 3])


def flip_boxes(boxes: tf.Tensor, width) -> tf.Tensor:
  """Mirrors xyxy boxes in an image `width` pixels wide (x -> width - x)."""
  x1, y1, x2, y2 = tf.unstack(boxes, axis=-1)
  width = tf.cast(width, boxes.dtype)
  return tf.stack([width - x2, y1, width - x1, y2], axis=-1)


def random_flip(image: tf.Tensor, boxes: tf.Tensor, seed: tf.Tensor):
  """Mirrors image and boxes left-right with probability 1/2 (one draw)."""
  flip = tf.random.stateless_uniform([], seed) < 0.5
  width = tf.shape(image)[1]
  image = tf.cond(flip, lambda: tf.reverse(image, [1]), lambda: image)
  boxes = tf.cond(flip, lambda: flip_boxes(boxes, width), lambda: boxes)
  return image, boxes


def random_offset(height_width: tf.Tensor, seed: tf.Tensor,
                  size: int) -> tf.Tensor:
  """[top, left] of a random size x size window; 0 on a side <= size."""
  room = tf.maximum(height_width - size, 0)
  unit = tf.random.stateless_uniform([2], seed)
  offset = tf.cast(unit * tf.cast(room + 1, tf.float32), tf.int32)
  return tf.minimum(offset, room)


def window(image: tf.Tensor, boxes: tf.Tensor, offset: tf.Tensor, size: int):
  """The size x size window at offset [top, left]; boxes shifted into it.

  Returns (image [<=size, <=size, 3], shifted boxes, clipped boxes): boxes
  are clipped to the image content inside the window, never to padding.
  """
  top, left = offset[0], offset[1]
  image = image[top:top + size, left:left + size]
  shifted = boxes - tf.cast(tf.stack([left, top, left, top]), boxes.dtype)
  extent = tf.cast(tf.shape(image)[:2], boxes.dtype)  # [h, w] of content.
  high = tf.stack([extent[1], extent[0], extent[1], extent[0]])
  clipped = tf.clip_by_value(shifted, 0.0, high)
  return image, shifted, clipped


def pad_image(image: tf.Tensor, size: int) -> tf.Tensor:
  """Pads bottom/right with 0 up to size x size (sides must be <= size)."""
  shape = tf.shape(image)
  image = tf.pad(image, [[0, size - shape[0]], [0, size - shape[1]], [0, 0]])
  return tf.ensure_shape(image, [size, size, 3])


def box_area(boxes: tf.Tensor) -> tf.Tensor:
  width = tf.maximum(boxes[:, 2] - boxes[:, 0], 0.0)
  height = tf.maximum(boxes[:, 3] - boxes[:, 1], 0.0)
  return width * height


def keep_mask(before: tf.Tensor, after: tf.Tensor, min_size: float,
              min_visible: float) -> tf.Tensor:
  """bool [K]: boxes that stay (positive and >= min_size on both sides,
  at least min_visible of the area `before` clipping left `after`)."""
  width = after[:, 2] - after[:, 0]
  height = after[:, 3] - after[:, 1]
  sized = ((width > 0) & (height > 0) & (width >= min_size)
           & (height >= min_size))
  return sized & (box_area(after) >= min_visible * box_area(before))


def pad_boxes(boxes: tf.Tensor, classes: tf.Tensor, max_boxes: int):
  """The first max_boxes boxes, padded to max_boxes rows (0 / class -1)."""
  boxes, classes = boxes[:max_boxes], classes[:max_boxes]
  missing = max_boxes - tf.shape(classes)[0]
  boxes = tf.pad(boxes, [[0, missing], [0, 0]])
  classes = tf.pad(classes, [[0, missing]], constant_values=-1)
  return (tf.ensure_shape(boxes, [max_boxes, 4]),
          tf.ensure_shape(classes, [max_boxes]))


def targets(example: dict):
  """(boxes float32 [K, 4], classes int32 [K]) without crowd boxes."""
  boxes = tf.reshape(tf.cast(example["boxes"], tf.float32), [-1, 4])
  classes = tf.reshape(tf.cast(example["classes"], tf.int32), [-1])
  if "crowd" in example:
    keep = tf.logical_not(tf.reshape(tf.cast(example["crowd"], tf.bool), [-1]))
    boxes = tf.boolean_mask(boxes, keep)
    classes = tf.boolean_mask(classes, keep)
  return boxes, classes


def fit_image(image: tf.Tensor, size: int, mean: Sequence[float],
              std: Sequence[float]):
  """uint8 [H, W, 3] -> (normalised float32 [size, size, 3], scale), as at
  eval: longer side to size, padded bottom/right. For predicting on images
  without boxes; network boxes / scale are original pixels."""
  scale = fit_scale(image, size)
  fitted = scale_image(image, scale)
  return pad_image(normalize(fitted, mean, std), size), scale


def check_box_config(config: ml_collections.ConfigDict) -> None:
  low, high = (float(v) for v in config.box_scale_range)
  if not 0 < low <= high:
    raise ValueError(f"config.box_scale_range={tuple(config.box_scale_range)} "
                     "must be (low, high) with 0 < low <= high, e.g. "
                     "(0.75, 1.25).")
  if int(config.max_boxes) < 1:
    raise ValueError(f"config.max_boxes={config.max_boxes} must be >= 1 (the "
                     "fixed number of box rows per image, e.g. 100).")
  if float(config.min_box_size) < 0:
    raise ValueError(f"config.min_box_size={config.min_box_size} must be >= 0 "
                     "(pixels after resizing, e.g. 1.0).")


def train_augment(image: tf.Tensor, boxes: tf.Tensor, classes: tf.Tensor,
                  seed: tf.Tensor, *, size: int,
                  scale_range: Sequence[float], flip: bool, min_size: float,
                  min_visible: float = MIN_VISIBLE_FRACTION):
  """Scale jitter, flip, random window: (image float32 [<=size, <=size, 3]
  in 0-255, boxes [K', 4], classes [K']), not yet normalised or padded."""
  scale_seed, crop_seed, flip_seed = tf.unstack(
      tf.random.experimental.stateless_split(seed, 3))
  low, high = (float(v) for v in scale_range)
  jitter = tf.random.stateless_uniform([], scale_seed, minval=low, maxval=high)
  scale = fit_scale(image, size) * jitter
  image = scale_image(image, scale)
  boxes = boxes * scale
  if flip:
    image, boxes = random_flip(image, boxes, flip_seed)
  offset = random_offset(tf.shape(image)[:2], crop_seed, size)
  image, shifted, clipped = window(image, boxes, offset, size)
  keep = keep_mask(shifted, clipped, min_size, min_visible)
  return image, tf.boolean_mask(clipped, keep), tf.boolean_mask(classes, keep)


def train_transform(config: ml_collections.ConfigDict, mean, std
                    ) -> Callable[[dict, tf.Tensor], dict]:
  """(example, seed [2]) -> {"image": f32 [S, S, 3], "boxes": f32 [M, 4],
  "classes": int32 [M]}."""
  check_box_config(config)
  size, max_boxes = int(config.image_size), int(config.max_boxes)
  options = dict(size=size, scale_range=tuple(config.box_scale_range),
                 flip=bool(config.flip), min_size=float(config.min_box_size))

  def transform(example, seed):
    boxes, classes = targets(example)
    image, boxes, classes = train_augment(example["image"], boxes, classes,
                                          seed, **options)
    image = pad_image(normalize(image, mean, std), size)
    boxes, classes = pad_boxes(boxes, classes, max_boxes)
    return {"image": image, "boxes": boxes, "classes": classes}

  return transform


def eval_transform(config: ml_collections.ConfigDict, mean, std
                   ) -> Callable[[dict], dict]:
  """example -> {"image", "boxes", "classes", "image_id": int32,
  "scale": float32, "orig_size": int32 [2] (H, W)}; deterministic."""
  check_box_config(config)
  size, max_boxes = int(config.image_size), int(config.max_boxes)
  min_size = float(config.min_box_size)

  def transform(example):
    boxes, classes = targets(example)
    image, scale = fit_image(example["image"], size, mean, std)
    orig_size = tf.shape(example["image"])[:2]
    content = scaled_size(orig_size, scale)  # Clip to it, not to padding.
    _, shifted, clipped = window(image[:content[0], :content[1]],
                                 boxes * scale, tf.zeros([2], tf.int32), size)
    keep = keep_mask(shifted, clipped, min_size, 0.0)
    boxes, classes = pad_boxes(tf.boolean_mask(clipped, keep),
                               tf.boolean_mask(classes, keep), max_boxes)
    return {"image": image, "boxes": boxes, "classes": classes,
            "image_id": tf.cast(example["image_id"], tf.int32),
            "scale": scale, "orig_size": tf.cast(orig_size, tf.int32)}

  return transform
