"""Train and eval batches on top of any `SplitSource`.

Train order is a pure function of (seed, step). Global step s reads positions
[s*B, (s+1)*B) of epoch e = s // steps_per_epoch, and position i of epoch e
is example `index_shuffle(i, seed(e))`: a seeded permutation computed per
index, so indices are shuffled, never decoded images, and the per-epoch
remainder (num_train % B) is dropped. `train_batches(start_step=k)` therefore
starts at step k without reading steps 0..k-1. Process p of P takes rows
[p*B/P, (p+1)*B/P) of each global batch, so the global batch does not depend
on the process count. Augmentation seeds are (seed, epoch, example index).

Stream sources (TFDS without `cache`) have no random access. Each epoch is
then `shuffle(shuffle_buffer, seed=f(seed, epoch))` of the enumerated,
still-encoded rows, rebuilt per epoch, so resuming stays exact: it skips the
partial epoch's rows before decoding. (tf.data mixes a global
`tf.random.set_seed` into that shuffle: set it the same way, or not at all,
when resuming.)

The source's `label_kind` picks the transforms: "class" (an int32 label per
image, `preprocess.py`), "mask" (an int32 [S, S] label map per image,
`preprocess_masks.py`, padding rows of eval batches labelled ignore_index)
or "boxes" ("boxes" float32 [M, 4] and "classes" int32 [M] per image, M =
`max_boxes`, class -1 on padding rows, `preprocess_boxes.py`; eval batches
add "image_id", "scale" and "orig_size", and their padding rows have
image_id -1, classes -1 and every other field 0).
"""
from __future__ import annotations

import math
from typing import Dict, Iterator, Optional, Sequence

import ml_collections
import numpy as np
import tensorflow as tf

from tlflax.data import cache as cache_lib
from tlflax.data import holdout
from tlflax.data import preprocess
from tlflax.data import preprocess_boxes
from tlflax.data import preprocess_masks
from tlflax.data.config import default_config
from tlflax.data.registry import build_source
from tlflax.data.source import Records, SplitSource

AUTOTUNE = tf.data.AUTOTUNE
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_SHUFFLE, _AUGMENT = 0, 1  # Seed purposes, so the two streams differ.
_NO_END = np.iinfo(np.int64).max
TRANSFORMS = {"class": preprocess, "mask": preprocess_masks,
              "boxes": preprocess_boxes}  # label_kind -> its module.


def _seed(seed: int, purpose: int, *data) -> tf.Tensor:
  """A stateless [2] int64 seed for (seed, purpose, *data)."""
  key = tf.constant([seed, purpose], tf.int64)
  for value in data:
    key = tf.random.experimental.stateless_fold_in(
        key, tf.cast(value, tf.int64))
  return key


def _constants(table) -> Dict[str, tf.Tensor]:
  return {k: tf.constant(v) for k, v in table.items()}


def _row(table: Dict[str, tf.Tensor], index: tf.Tensor) -> Dict[str, tf.Tensor]:
  return {k: tf.gather(v, index) for k, v in table.items()}


def eval_positions(num: int, batch: int, local_batch: int, process_index: int,
                   num_batches: int) -> np.ndarray:
  """Split positions (in order) this process evaluates; the rest is padding."""
  k = np.arange(num_batches, dtype=np.int64)[:, None]
  j = np.arange(local_batch, dtype=np.int64)[None, :]
  positions = (k * batch + process_index * local_batch + j).reshape(-1)
  return positions[positions < num]


def _local(name: str, size: int, process_count: int) -> int:
  if size <= 0 or size % process_count:
    raise ValueError(f"{name}={size} must be positive and divisible by "
                     f"process_count={process_count}.")
  return size // process_count


class Pipeline:
  """Numpy batches for one process: see the module docstring for the order.

  `batch_size`/`eval_batch_size` are global; this process yields
  `local_batch_size` / `local_eval_batch_size` rows (equal when
  process_count=1). `num_train`/`num_eval` count the whole split.
  """

  def __init__(self, source: SplitSource, config: ml_collections.ConfigDict,
               *, batch_size: int, eval_batch_size: int, seed: int,
               mean: Sequence[float], std: Sequence[float],
               process_index: int = 0, process_count: int = 1):
    if not 0 <= process_index < process_count:
      raise ValueError(f"process_index={process_index} is not in "
                       f"[0, process_count={process_count}).")
    self.source, self.config, self.seed = source, config, int(seed)
    self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
    self.process_index, self.process_count = process_index, process_count
    self.local_batch_size = _local("batch_size", batch_size, process_count)
    self.local_eval_batch_size = _local("eval_batch_size", eval_batch_size,
                                        process_count)
    self.steps_per_epoch = source.num_train // batch_size
    if self.steps_per_epoch == 0:
      raise ValueError(f"batch_size={batch_size} is larger than the "
                       f"{source.num_train} training examples.")
    self.num_eval_batches = math.ceil(source.num_eval / eval_batch_size)
    transforms = TRANSFORMS[self.label_kind]
    self._train_fn = transforms.train_transform(config, mean, std)
    self._eval_fn = transforms.eval_transform(config, mean, std)
    self._records: Dict[str, Records] = {}

  class_names = property(lambda self: self.source.class_names)
  label_kind = property(lambda self: self.source.label_kind)
  ignore_index = property(lambda self: int(self.config.ignore_index))
  num_train = property(lambda self: self.source.num_train)
  num_eval = property(lambda self: self.source.num_eval)
  skipped = property(lambda self: self.source.skipped)

  def records(self, split: str) -> Records:
    """The split's rows, decoded into memory once when `config.cache`."""
    if split not in self._records:
      records = self.source.records(split)
      if self.config.cache:
        records = cache_lib.in_memory(records)
      self._records[split] = records
    return self._records[split]

  def train_batches(self, start_step: int = 0) -> Iterator[dict]:
    """Endless {"image": float32 [b,S,S,3], "label": int32 [b]} from a step.

    With masks the label is int32 [b, S, S]; with boxes there is no label
    but "boxes" float32 [b, M, 4] and "classes" int32 [b, M].
    """
    return self.train_dataset(start_step).as_numpy_iterator()

  def eval_batches(self) -> Iterator[dict]:
    """One pass over eval; every batch full size with "mask" (0 = padding)."""
    return self.eval_dataset().as_numpy_iterator()

  def train_dataset(self, start_step: int = 0) -> tf.data.Dataset:
    if start_step < 0:
      raise ValueError(f"start_step={start_step} must be >= 0.")
    records = self.records("train")
    if records.table is not None:
      examples = self._train_from_table(records, start_step)
    else:
      examples = self._train_from_stream(records, start_step)
    examples = examples.batch(self.local_batch_size, drop_remainder=True)
    return examples.prefetch(AUTOTUNE)

  def _train_from_table(self, records: Records, start_step: int):
    table = _constants(records.table)
    big, small = self.batch_size, self.local_batch_size
    spe = self.steps_per_epoch
    offset = self.process_index * small
    max_index = tf.constant(records.num - 1, tf.int64)

    def load(t):
      step = start_step + t // small
      epoch = step // spe
      position = (step % spe) * big + offset + t % small
      index = tf.random.experimental.index_shuffle(
          position, _seed(self.seed, _SHUFFLE, epoch), max_index)
      example = records.decode(_row(table, index))
      return self._train_fn(example, _seed(self.seed, _AUGMENT, epoch, index))

    return tf.data.Dataset.range(_NO_END).map(
        load, num_parallel_calls=AUTOTUNE, deterministic=True)

  def _train_from_stream(self, records: Records, start_step: int):
    rows = records.stream.enumerate()  # (index in split, row)
    big, small = self.batch_size, self.local_batch_size
    spe = self.steps_per_epoch
    start_epoch, skip_steps = divmod(start_step, spe)
    process = self.process_index

    def epoch_rows(epoch):
      shuffle_seed = tf.random.stateless_uniform(
          [], _seed(self.seed, _SHUFFLE, epoch), minval=None, maxval=None,
          dtype=tf.int64)
      ds = rows.shuffle(self.config.shuffle_buffer, seed=shuffle_seed,
                        reshuffle_each_iteration=False)
      ds = ds.take(spe * big).enumerate()  # (position in epoch, row)
      ds = ds.filter(lambda pos, _: (pos % big) // small == process)
      skip = tf.where(epoch == start_epoch, tf.constant(skip_steps * small,
                                                        tf.int64),
                      tf.constant(0, tf.int64))
      return ds.skip(skip).map(lambda _, item: (epoch, item[0], item[1]))

    def load(epoch, index, row):
      example = records.decode(row)
      return self._train_fn(example, _seed(self.seed, _AUGMENT, epoch, index))

    epochs = tf.data.Dataset.range(start_epoch, _NO_END)
    return epochs.flat_map(epoch_rows).map(
        load, num_parallel_calls=AUTOTUNE, deterministic=True)

  def eval_dataset(self) -> tf.data.Dataset:
    records = self.records("eval")
    big, small = self.eval_batch_size, self.local_eval_batch_size
    positions = eval_positions(records.num, big, small, self.process_index,
                               self.num_eval_batches)

    def load(row):
      return {**self._eval_fn(records.decode(row)),
              "mask": tf.constant(1.0, tf.float32)}

    if records.table is not None:
      table = _constants(records.table)
      rows = tf.data.Dataset.from_tensor_slices(positions).map(
          lambda i: _row(table, i))
    else:
      process = self.process_index
      rows = records.stream.enumerate().filter(
          lambda pos, _: (pos % big) // small == process).map(lambda _, r: r)
    examples = rows.map(load, num_parallel_calls=AUTOTUNE, deterministic=True)
    padding = self.num_eval_batches * small - len(positions)
    examples = examples.concatenate(
        tf.data.Dataset.from_tensors(self._padding()).repeat(padding))
    return examples.batch(small, drop_remainder=True).prefetch(AUTOTUNE)

  def _padding(self) -> dict:
    """The row that fills the last eval batch: mask 0, labels ignored."""
    size = self.config.image_size
    if self.label_kind == "boxes":
      return self._box_padding()
    if self.label_kind == "mask":
      label = tf.fill([size, size], tf.constant(self.ignore_index, tf.int32))
    else:
      label = tf.constant(0, tf.int32)
    return {"image": tf.zeros([size, size, 3], tf.float32), "label": label,
            "mask": tf.constant(0.0, tf.float32)}

  def _box_padding(self) -> dict:
    """A detection padding row: no boxes, image_id -1, scale and size 0."""
    size, max_boxes = self.config.image_size, int(self.config.max_boxes)
    return {"image": tf.zeros([size, size, 3], tf.float32),
            "boxes": tf.zeros([max_boxes, 4], tf.float32),
            "classes": tf.fill([max_boxes], tf.constant(-1, tf.int32)),
            "image_id": tf.constant(-1, tf.int32),
            "scale": tf.constant(0.0, tf.float32),
            "orig_size": tf.zeros([2], tf.int32),
            "mask": tf.constant(0.0, tf.float32)}


def with_defaults(
    config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`config` over `default_config()`, so partial configs work too."""
  merged = default_config()
  merged.update(config.to_dict() if hasattr(config, "to_dict") else config)
  return merged


def build(config: ml_collections.ConfigDict, batch_size: int = 32,
          eval_batch_size: Optional[int] = None, seed: int = 0,
          mean: Sequence[float] = IMAGENET_MEAN,
          std: Sequence[float] = IMAGENET_STD, *, process_index: int = 0,
          process_count: int = 1) -> Pipeline:
  """Builds `config.name`'s dataset and wraps it in a `Pipeline`.

  mean/std are per-channel in [0, 1] units (images are divided by 255 first);
  eval_batch_size defaults to batch_size.
  """
  config = with_defaults(config)
  if len(mean) != 3 or len(std) != 3:
    raise ValueError(f"mean and std need 3 values (RGB), got {mean}, {std}.")
  source = build_source(config)
  if config.holdout_fraction:
    source = holdout.carve_holdout(source, config.holdout_fraction, config.holdout_seed)
  return Pipeline(source, config, batch_size=batch_size,
                  eval_batch_size=eval_batch_size or batch_size, seed=seed,
                  mean=tuple(mean), std=tuple(std),
                  process_index=process_index, process_count=process_count)
