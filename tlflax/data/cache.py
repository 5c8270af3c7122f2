"""`config.cache`: decode a split once and keep the examples in memory.

Array fields (the image, a segmentation mask) go into one flat buffer each
with per-example offsets and shapes (sizes may differ per example); scalar
fields (a class label) stay plain columns. That keeps random access: the
pipeline still shuffles indices, and a stream source (TFDS) becomes a table,
so its shuffle becomes an exact permutation as well.
"""
from __future__ import annotations

from typing import Dict, List

import numpy as np
import tensorflow as tf

from tlflax.data.source import Records


def _pack(arrays: List[np.ndarray]):
  """Arrays of one rank -> (flat constant, offsets [N], shapes [N, rank])."""
  shapes = np.array([a.shape for a in arrays], np.int64)
  sizes = shapes.prod(axis=1)
  offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
  flat = tf.constant(np.concatenate([a.reshape(-1) for a in arrays]))
  return flat, offsets, shapes


def _static_shape(shapes: np.ndarray) -> List:
  """Dimensions equal in every example stay static (e.g. 3 colour channels)."""
  return [int(d[0]) if (d == d[0]).all() else None for d in shapes.T]


def in_memory(records: Records) -> Records:
  """`records` with every example decoded; a no-op for in-memory sources."""
  if records.in_memory or records.num == 0:
    return records
  columns: Dict[str, list] = {}
  for example in records.examples().as_numpy_iterator():
    for key, value in example.items():
      columns.setdefault(key, []).append(value)
  table, packed = {}, {}
  for key, values in columns.items():
    if np.ndim(values[0]) == 0:
      table[key] = np.asarray(values)
      continue
    flat, table[key + "/offset"], table[key + "/shape"] = _pack(values)
    packed[key] = (flat, _static_shape(table[key + "/shape"]))

  def decode(row):
    example = {k: row[k] for k in columns if k not in packed}
    for key, (flat, static_shape) in packed.items():
      start, shape = row[key + "/offset"], row[key + "/shape"]
      value = tf.reshape(flat[start:start + tf.reduce_prod(shape)], shape)
      value.set_shape(static_shape)
      example[key] = value
    return example

  return Records(num=len(next(iter(columns.values()))), decode=decode,
                 table=table, in_memory=True)
