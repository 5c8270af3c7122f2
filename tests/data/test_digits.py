"""digits: fixed stratified 80/20 split, uint8 RGB images."""
import numpy as np

from tlflax import data


def _labels(ds):
  return np.array([int(ex["label"]) for ex in ds.as_numpy_iterator()])


def test_counts_names_and_images():
  source = data.build_source(data.default_config())
  assert (source.num_train, source.num_eval) == (1437, 360)
  assert source.class_names == [str(i) for i in range(10)]
  assert source.skipped == []
  example = next(source.train.as_numpy_iterator())
  assert example["image"].shape == (8, 8, 3)
  assert example["image"].dtype == np.uint8
  assert example["label"].dtype == np.int32
  images = source.train_records.table["image"]
  assert images.max() == 255 and images.min() == 0
  assert (images[..., 0] == images[..., 2]).all()


def test_split_is_stratified_and_fixed():
  source = data.build_source(data.default_config())
  train, evaluation = _labels(source.train), _labels(source.eval)
  assert len(train) == 1437 and len(evaluation) == 360
  all_counts = np.bincount(np.concatenate([train, evaluation]), minlength=10)
  np.testing.assert_allclose(np.bincount(evaluation, minlength=10),
                             all_counts * 0.2, atol=1)
  again = _labels(data.build_source(data.default_config()).eval)
  np.testing.assert_array_equal(evaluation, again)
