"""data.holdout_fraction: a seeded, stratified selection split carved from train."""
import numpy as np
import pytest

from tlflax import data
from tlflax.data import holdout


def digits_config(**fields):
  cfg = data.default_config()
  cfg.name, cfg.image_size, cfg.train_crop, cfg.eval_crop = "digits", 16, "resize", "resize"
  cfg.update(fields)
  return cfg


def test_holdout_replaces_eval_with_a_stratified_part_of_train():
  full = data.build_source(digits_config())
  train_labels = np.asarray(full.records("train").table["label"])
  pipe = data.build(digits_config(holdout_fraction=0.25, holdout_seed=3), batch_size=32)
  assert pipe.num_train + pipe.num_eval == full.num_train == 1437
  assert pipe.class_names == full.class_names
  kept = pipe.records("train").table
  held = pipe.records("eval").table
  for c in range(10):  # Each class is split 75 / 25 (rounded).
    assert (held["label"] == c).sum() == round((train_labels == c).sum() * 0.25)
  # Disjoint and drawn from train only: the images are rows of the original train table.
  original = {row.tobytes() for row in np.asarray(full.records("train").table["image"])}
  held_rows = {row.tobytes() for row in held["image"]}
  assert held_rows <= original and not held_rows & {row.tobytes() for row in kept["image"]}
  again = data.build(digits_config(holdout_fraction=0.25, holdout_seed=3), batch_size=32)
  np.testing.assert_array_equal(again.records("eval").table["label"], held["label"])


def test_holdout_indices_and_errors():
  labels = np.array([0] * 8 + [1] * 4)
  train, held = holdout.holdout_indices(labels, 12, 0.5, seed=0)
  assert sorted(np.concatenate([train, held]).tolist()) == list(range(12))
  assert (labels[held] == 0).sum() == 4 and (labels[held] == 1).sum() == 2
  with pytest.raises(ValueError, match="must be in"):
    data.build(digits_config(holdout_fraction=1.0))
  with pytest.raises(ValueError, match="empty split"):
    holdout.carve_holdout(data.build_source(digits_config()), 1e-6)
