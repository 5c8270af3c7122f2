"""What a dataset builder hands to the pipeline: `SplitSource` and `Records`.

A builder describes each split twice. `train`/`eval` are the decoded examples
in a fixed order (the simple contract anyone can iterate). `Records` is the
same split as cheap rows (file paths, encoded bytes, in-memory arrays) plus
the `decode` step, so the pipeline can shuffle, shard and skip rows and decode
only the examples that end up in a batch.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf

Example = Mapping[str, tf.Tensor]
AUTOTUNE = tf.data.AUTOTUNE
LABEL_KINDS = ("class", "mask", "boxes")


def identity(record: Example) -> Example:
  return record


@dataclasses.dataclass(frozen=True)
class Records:
  """One split as undecoded rows plus `decode` (row -> example).

  Exactly one of `table` (numpy arrays with one row per example: random
  access, so the pipeline shuffles indices) or `stream` (a finite
  `tf.data.Dataset` read in order, e.g. TFDS) holds the rows. `in_memory`
  marks rows that already are decoded images, for which caching is a no-op.
  """
  num: int
  decode: Callable[[Example], Example] = identity
  table: Optional[Mapping[str, np.ndarray]] = None
  stream: Optional[tf.data.Dataset] = None
  in_memory: bool = False

  def __post_init__(self):
    if (self.table is None) == (self.stream is None):
      raise ValueError("Records needs exactly one of `table` or `stream`.")
    if self.table is not None:
      lengths = {k: len(v) for k, v in self.table.items()}
      if set(lengths.values()) != {self.num}:
        raise ValueError(f"Records table columns {lengths} must all have "
                         f"num={self.num} rows.")

  @classmethod
  def from_arrays(cls, images: np.ndarray, labels: np.ndarray) -> "Records":
    """Decoded images held in memory (one uint8 [N, H, W, 3] array)."""
    table = {"image": np.asarray(images, np.uint8),
             "label": np.asarray(labels, np.int32)}
    return cls(num=len(labels), table=table, in_memory=True)

  def rows(self) -> tf.data.Dataset:
    if self.table is not None:
      return tf.data.Dataset.from_tensor_slices(dict(self.table))
    return self.stream

  def examples(self) -> tf.data.Dataset:
    """Decoded examples in the split's fixed order."""
    return self.rows().map(self.decode, num_parallel_calls=AUTOTUNE,
                           deterministic=True)


@dataclasses.dataclass
class SplitSource:
  """A dataset's two splits, unshuffled, in a fixed deterministic order.

  `train`/`eval` yield {"image": uint8 [H, W, 3] (size may vary per example),
  "label": ...}. With `label_kind` "class" the label is an int32 scalar; with
  "mask" it is a uint8 or int32 [H, W] map of class indices, the config's
  `ignore_index` marking pixels without a class. With "boxes" there is no
  "label": examples are {"image", "boxes": float32 [K, 4] (x1, y1, x2, y2)
  in original pixels (continuous, 0-based), "classes": int32 [K],
  "image_id": int32 (the example's index in its split)}, optionally with
  "crowd": bool [K] (COCO iscrowd / VOC difficult: no training target,
  ignored by COCOeval) and "area": float32 [K] (the area COCOeval buckets
  by; the box area when absent). `skipped` lists (path, reason) for inputs
  the builder left out (or, for boxes, repaired). Builders that can, also fill
  `train_records` and `eval_records` (see `Records`); without them the
  pipeline falls back to reading `train`/`eval` as streams.
  """
  class_names: List[str]
  train: tf.data.Dataset
  eval: tf.data.Dataset
  num_train: int
  num_eval: int
  skipped: List[Tuple[str, str]] = dataclasses.field(default_factory=list)
  train_records: Optional[Records] = None
  eval_records: Optional[Records] = None
  label_kind: str = "class"

  def __post_init__(self):
    if self.label_kind not in LABEL_KINDS:
      raise ValueError(f"label_kind={self.label_kind!r} is not one of "
                       f"{list(LABEL_KINDS)}.")

  @classmethod
  def from_records(cls, class_names: Sequence[str], train: Records,
                   eval: Records,  # pylint: disable=redefined-builtin
                   skipped: Sequence[Tuple[str, str]] = (),
                   label_kind: str = "class") -> "SplitSource":
    return cls(class_names=list(class_names), train=train.examples(),
               eval=eval.examples(), num_train=train.num, num_eval=eval.num,
               skipped=list(skipped), train_records=train, eval_records=eval,
               label_kind=label_kind)

  def records(self, split: str) -> Records:
    """The split as `Records`, wrapping the decoded dataset if none given."""
    if split == "train":
      return self.train_records or Records(self.num_train, stream=self.train)
    if split == "eval":
      return self.eval_records or Records(self.num_eval, stream=self.eval)
    raise ValueError(f"split must be 'train' or 'eval', got {split!r}.")
