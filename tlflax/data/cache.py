"""`config.cache`: decode a split once and keep the images in memory.

The decoded images go into one flat uint8 buffer with per-example offsets and
shapes (images may differ in size), which keeps random access: the pipeline
still shuffles indices, and a stream source (TFDS) becomes a table, so its
shuffle becomes an exact permutation as well.
"""
from __future__ import annotations

import numpy as np
import tensorflow as tf

from tlflax.data.source import Records


def in_memory(records: Records) -> Records:
  """`records` with every image decoded; a no-op for in-memory sources."""
  if records.in_memory:
    return records
  images, labels = [], []
  for example in records.examples().as_numpy_iterator():
    images.append(example["image"])
    labels.append(example["label"])
  shapes = np.array([im.shape for im in images], np.int64).reshape(-1, 3)
  sizes = shapes.prod(axis=1)
  offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
  flat = tf.constant(np.concatenate([im.reshape(-1) for im in images])
                     if images else np.zeros([0], np.uint8))

  def decode(row):
    size = tf.reduce_prod(row["shape"])
    image = tf.reshape(flat[row["offset"]:row["offset"] + size], row["shape"])
    image.set_shape([None, None, 3])
    return {"image": image, "label": row["label"]}

  table = {"offset": offsets, "shape": shapes,
           "label": np.asarray(labels, np.int32)}
  return Records(num=len(images), decode=decode, table=table, in_memory=True)
