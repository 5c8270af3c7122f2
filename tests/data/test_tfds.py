"""TFDS datasets through tfds.testing.mock_data (no network, no files)."""
import itertools

import numpy as np
import pytest
import tensorflow_datasets as tfds

from tlflax import data

NUM = 20


def _config(name, **overrides):
  config = data.default_config()
  config.name = name
  config.image_size = 16
  config.update(overrides)
  return config


@pytest.mark.parametrize("name,num_classes", [
    ("cifar10", 10), ("cifar100", 100), ("svhn_cropped", 10), ("mnist", 10)])
def test_builds_and_yields_batches(name, num_classes):
  with tfds.testing.mock_data(num_examples=NUM):
    pipe = data.build(_config(name), batch_size=8, eval_batch_size=8)
    assert len(pipe.class_names) == num_classes
    assert (pipe.num_train, pipe.num_eval) == (NUM, NUM)
    batch = next(pipe.train_batches())
    assert batch["image"].shape == (8, 16, 16, 3)
    assert batch["image"].dtype == np.float32
    assert batch["label"].dtype == np.int32
    assert ((batch["label"] >= 0) & (batch["label"] < num_classes)).all()
    masks = [b["mask"] for b in pipe.eval_batches()]
    assert len(masks) == 3 and sum(m.sum() for m in masks) == NUM


def test_stream_resume_and_eval_coverage():
  with tfds.testing.mock_data(num_examples=NUM):
    pipe = data.build(_config("cifar10", shuffle_buffer=7), batch_size=6,
                      eval_batch_size=8, seed=2)  # 3 steps per epoch.
    fresh = list(itertools.islice(pipe.train_batches(), 8))
    for k in (1, 3, 7):
      resumed = next(pipe.train_batches(start_step=k))
      np.testing.assert_array_equal(resumed["image"], fresh[k]["image"])
      np.testing.assert_array_equal(resumed["label"], fresh[k]["label"])
    labels = [int(ex["label"]) for ex in pipe.source.eval.as_numpy_iterator()]
    batches = list(pipe.eval_batches())
    mask = np.concatenate([b["mask"] for b in batches]) == 1
    seen = np.concatenate([b["label"] for b in batches])[mask]
    np.testing.assert_array_equal(seen, labels)


def test_stream_shards_match_single_process():
  with tfds.testing.mock_data(num_examples=NUM):
    def first(**kw):
      pipe = data.build(_config("mnist"), batch_size=6, eval_batch_size=8,
                        seed=1, **kw)
      return next(pipe.train_batches(start_step=4)), list(pipe.eval_batches())
    (train, evaluation) = first()
    shards = [first(process_index=p, process_count=2) for p in range(2)]
    np.testing.assert_array_equal(
        np.concatenate([s[0]["image"] for s in shards]), train["image"])
    for k, whole in enumerate(evaluation):
      np.testing.assert_array_equal(
          np.concatenate([s[1][k]["mask"] for s in shards]), whole["mask"])


def test_cache_turns_the_stream_into_an_exact_permutation():
  with tfds.testing.mock_data(num_examples=NUM):
    plain = data.build(_config("svhn_cropped"), batch_size=5, eval_batch_size=8)
    cached = data.build(_config("svhn_cropped", cache=True), batch_size=5,
                        eval_batch_size=8)
    assert cached.records("train").table is not None
    for a, b in zip(plain.eval_batches(), cached.eval_batches()):
      np.testing.assert_array_equal(a["image"], b["image"])
    labels = np.concatenate(
        [b["label"] for b in itertools.islice(cached.train_batches(), 4)])
    expected = [int(ex["label"])
                for ex in cached.source.train.as_numpy_iterator()]
    np.testing.assert_array_equal(np.sort(labels), np.sort(expected))
