"""Pipeline: determinism, exact resume, full eval coverage, sharding."""
import itertools

import numpy as np
import pytest

from tlflax import data


def _take(iterator, n):
  return list(itertools.islice(iterator, n))


def _assert_same(a, b):
  assert a.keys() == b.keys()
  for key in a:
    np.testing.assert_array_equal(a[key], b[key])


def test_train_batches_shapes(digits_config):
  pipe = data.build(digits_config, batch_size=32, eval_batch_size=64)
  assert pipe.steps_per_epoch == 1437 // 32
  batch = next(pipe.train_batches())
  assert set(batch) == {"image", "label"}
  assert batch["image"].shape == (32, 16, 16, 3)
  assert batch["image"].dtype == np.float32
  assert batch["label"].shape == (32,) and batch["label"].dtype == np.int32


def test_same_seed_same_batches_other_seed_differs(digits_config):
  a = _take(data.build(digits_config, batch_size=64, seed=3).train_batches(), 3)
  b = _take(data.build(digits_config, batch_size=64, seed=3).train_batches(), 3)
  c = _take(data.build(digits_config, batch_size=64, seed=4).train_batches(), 3)
  for x, y in zip(a, b):
    _assert_same(x, y)
  assert not np.array_equal(a[0]["label"], c[0]["label"])
  assert not np.array_equal(a[0]["image"], c[0]["image"])


def test_resume_equals_kth_batch_across_epochs(digits_config):
  pipe = data.build(digits_config, batch_size=256, seed=1)  # 5 steps per epoch.
  fresh = _take(pipe.train_batches(), 12)
  for k in (1, 4, 5, 7, 11):
    _assert_same(next(pipe.train_batches(start_step=k)), fresh[k])


def test_each_epoch_is_a_permutation(digits_config):
  pipe = data.build(digits_config, batch_size=479, seed=0)  # 1437 = 3 * 479.
  labels = np.concatenate([b["label"] for b in _take(pipe.train_batches(), 6)])
  expected = np.sort(pipe.source.train_records.table["label"])
  np.testing.assert_array_equal(np.sort(labels[:1437]), expected)
  np.testing.assert_array_equal(np.sort(labels[1437:]), expected)
  assert not np.array_equal(labels[:1437], labels[1437:])


def test_eval_sees_every_example_once(digits_config):
  # 360 % 48 = 24: the last batch is half padding.
  pipe = data.build(digits_config, batch_size=32, eval_batch_size=48)
  batches = list(pipe.eval_batches())
  assert len(batches) == pipe.num_eval_batches == 8
  assert all(b["image"].shape == (48, 16, 16, 3) for b in batches)
  assert all(b["mask"].shape == (48,) and b["mask"].dtype == np.float32
             for b in batches)
  masks = np.concatenate([b["mask"] for b in batches])
  labels = np.concatenate([b["label"] for b in batches])
  assert masks.sum() == pipe.num_eval == 360
  np.testing.assert_array_equal(masks, np.repeat([1.0, 0.0], [360, 24]))
  expected = [int(ex["label"]) for ex in pipe.source.eval.as_numpy_iterator()]
  np.testing.assert_array_equal(labels[masks == 1], expected)
  assert np.all(batches[-1]["image"][masks[-48:] == 0] == 0)


@pytest.mark.parametrize("split", ["train", "eval"])
def test_process_shards_add_up_to_the_single_process_batch(
    digits_config, split):
  def batches(**kw):
    pipe = data.build(digits_config, batch_size=64, eval_batch_size=64, seed=5,
                      **kw)
    if split == "train":
      return _take(pipe.train_batches(start_step=2), 6)
    return _take(pipe.eval_batches(), 6)
  single = batches()
  shards = [batches(process_index=p, process_count=2) for p in range(2)]
  assert len(shards[0]) == len(shards[1]) == len(single)
  for k, whole in enumerate(single):
    for key in whole:
      joined = np.concatenate([shards[0][k][key], shards[1][k][key]])
      np.testing.assert_array_equal(joined, whole[key])


def test_batch_must_divide_between_processes(digits_config):
  with pytest.raises(ValueError, match="divisible"):
    data.build(digits_config, batch_size=33, process_count=2)
