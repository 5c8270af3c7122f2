"""`digits`: scikit-learn's bundled 8x8 handwritten digits (no download).

Small enough to hold in memory and to train on in seconds on a CPU, which
makes it the smoke-test dataset. Images stay 8x8; preprocessing upscales.
"""
from __future__ import annotations

import ml_collections
import numpy as np

from tlflax.data.registry import register_dataset
from tlflax.data.source import Records, SplitSource

TEST_SIZE = 0.2  # A fixed 80/20 split: 1437 train / 360 eval.


def to_rgb_uint8(images: np.ndarray) -> np.ndarray:
  """Grey levels 0..16 -> uint8 0..255, repeated into 3 channels."""
  grey = np.round(np.asarray(images, np.float64) * (255.0 / 16.0))
  grey = np.clip(grey, 0, 255).astype(np.uint8)
  return np.repeat(grey[..., None], 3, axis=-1)


def split_indices(labels: np.ndarray, seed: int):
  """Stratified train/eval indices, sorted: the split keeps the file order."""
  from sklearn.model_selection import train_test_split  # Lazy: slow import.
  train, evaluation = train_test_split(
      np.arange(len(labels)), test_size=TEST_SIZE, random_state=seed,
      stratify=labels)
  return np.sort(train), np.sort(evaluation)


@register_dataset("digits")
def digits(config: ml_collections.ConfigDict) -> SplitSource:
  from sklearn.datasets import load_digits  # Lazy: slow import.
  bunch = load_digits()
  images = to_rgb_uint8(bunch.images)
  labels = bunch.target.astype(np.int32)
  train, evaluation = split_indices(labels, config.split_seed)
  return SplitSource.from_records(
      class_names=[str(n) for n in bunch.target_names],
      train=Records.from_arrays(images[train], labels[train]),
      eval=Records.from_arrays(images[evaluation], labels[evaluation]))
