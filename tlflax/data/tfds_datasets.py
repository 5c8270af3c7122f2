"""TFDS datasets: cifar10, cifar100, svhn_cropped, mnist.

Images are read still encoded (`SkipDecoding`) and decoded by the pipeline,
so shuffle buffers hold small PNG bytes and examples skipped on resume are
never decoded. Counts come from the dataset's cardinality, which TFDS sets
from `info.splits` (and which stays right under `tfds.testing.mock_data`,
where `info.splits` is empty or does not match the fake examples).
"""
from __future__ import annotations

import ml_collections
import tensorflow as tf

from tlflax.data.preprocess import decode_image
from tlflax.data.registry import register_dataset
from tlflax.data.source import Records, SplitSource

TFDS_NAMES = ("cifar10", "cifar100", "svhn_cropped", "mnist")
DEFAULT_EVAL_SPLIT = "test"


def decode_record(record) -> dict:
  return {"image": decode_image(record["image"]), "label": record["label"]}


def count(ds: tf.data.Dataset, info, split: str) -> int:
  n = int(ds.cardinality())
  return n if n >= 0 else info.splits[split].num_examples


def load_split(name: str, split: str, config: ml_collections.ConfigDict):
  """(Records with encoded images, info) for one TFDS split, in file order."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  ds, info = tfds.load(
      name, split=split, data_dir=config.tfds_data_dir, with_info=True,
      shuffle_files=False,
      decoders={config.image_key: tfds.decode.SkipDecoding()})
  n = count(ds, info, split)
  ds = ds.map(lambda ex: {"image": ex[config.image_key],
                          "label": tf.cast(ex[config.label_key], tf.int32)})
  return Records(num=n, decode=decode_record, stream=ds), info


def load_tfds(name: str, config: ml_collections.ConfigDict) -> SplitSource:
  """`tfds.load(name)`: train_split / eval_split (default "test"), labels'
  class names from `info.features[label_key].names`; grey becomes RGB."""
  train, info = load_split(name, config.train_split, config)
  evaluation, _ = load_split(
      name, config.eval_split or DEFAULT_EVAL_SPLIT, config)
  names = list(info.features[config.label_key].names)
  return SplitSource.from_records(names, train=train, eval=evaluation)


def _make_builder(name: str):
  def builder(config: ml_collections.ConfigDict) -> SplitSource:
    return load_tfds(name, config)

  builder.__name__ = builder.__qualname__ = name
  builder.__doc__ = f"TFDS dataset `{name}`, read by `load_tfds`."
  return builder


for _name in TFDS_NAMES:
  register_dataset(_name)(_make_builder(_name))
