"""Few-shot ridge evaluation: seeded class-balanced draws, ridge against lstsq, features."""
import json

import ml_collections
import numpy as np
import optax
import pytest

from tlflax import data, steps, train
from tlflax.config import base_config
from tlflax.transfer import fewshot


def reference_ridge_predict(train_x, train_y, test_x, num_classes, l2_reg):
  """Slow and obvious: L2-normalise, centre by the train mean, then one least-squares problem
  [X 1; sqrt(l2) I 0] [W; b] = [Y; 0] (penalises W, not the bias) solved by lstsq."""
  norm = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
  x, t = norm(np.asarray(train_x, np.float64)), norm(np.asarray(test_x, np.float64))
  mean = x.mean(0)
  x, t = x - mean, t - mean
  n, d = x.shape
  y = np.full((n, num_classes), -1.0)
  y[np.arange(n), train_y] = 1.0
  design = np.block([[x, np.ones((n, 1))], [np.sqrt(l2_reg) * np.eye(d), np.zeros((d, 1))]])
  target = np.concatenate([y, np.zeros((d, num_classes))])
  wb = np.linalg.lstsq(design, target, rcond=None)[0]
  return t @ wb[:-1] + wb[-1]


def test_draws_are_class_balanced_distinct_and_seeded():
  rng = np.random.RandomState(0)
  labels = rng.randint(0, 4, size=200)
  for k in (1, 5, 25):
    idx = fewshot.support_indices(labels, k, seed=3, draw=1)
    assert len(set(idx.tolist())) == len(idx) == 4 * k
    np.testing.assert_array_equal(np.bincount(labels[idx], minlength=4), [k] * 4)
    np.testing.assert_array_equal(idx, fewshot.support_indices(labels, k, seed=3, draw=1))
  a = fewshot.support_indices(labels, 5, seed=3, draw=0)
  assert not np.array_equal(a, fewshot.support_indices(labels, 5, seed=3, draw=1))
  assert not np.array_equal(a, fewshot.support_indices(labels, 5, seed=4, draw=0))
  with pytest.raises(ValueError, match="Class 2 has 1 training images, fewer than 3 shots"):
    fewshot.support_indices(np.array([0, 0, 0, 1, 1, 1, 2]), 3, seed=0, draw=0)


@pytest.mark.parametrize("n_per_class,dim", [(2, 30), (20, 6)])  # Both branches: n < d, n > d.
def test_ridge_matches_lstsq_reference(n_per_class, dim):
  rng = np.random.RandomState(1)
  num_classes, l2_reg = 3, 0.3
  x = rng.randn(num_classes * n_per_class, dim)
  y = np.repeat(np.arange(num_classes), n_per_class)
  test = rng.randn(17, dim)
  got = fewshot.ridge_scores(fewshot.ridge_fit(x, y, num_classes, l2_reg), test)
  np.testing.assert_allclose(got, reference_ridge_predict(x, y, test, num_classes, l2_reg),
                             rtol=1e-9, atol=1e-9)


def test_fewshot_accuracies_equal_per_draw_reference():
  rng = np.random.RandomState(2)
  num_classes, dim = 4, 12
  centres = rng.randn(num_classes, dim)
  pool_y = np.repeat(np.arange(num_classes), 30)
  pool = centres[pool_y] + 1.5 * rng.randn(len(pool_y), dim)
  test_y = np.repeat(np.arange(num_classes), 25)
  test = centres[test_y] + 1.5 * rng.randn(len(test_y), dim)
  accs = fewshot.fewshot_accuracies(dict(enumerate(pool)), pool_y, test, test_y, num_classes,
                                    shots=(1, 5), draws=3, seed=7, l2_reg=0.5)
  for k in (1, 5):
    for draw in range(3):
      idx = fewshot.support_indices(pool_y, k, 7, draw)
      scores = reference_ridge_predict(pool[idx], pool_y[idx], test, num_classes, 0.5)
      assert accs[k][draw] == pytest.approx(np.mean(scores.argmax(1) == test_y), abs=1e-12)
  assert 0.25 < np.mean(accs[1]) < np.mean(accs[5])  # Noisy classes: more shots help.
  scalars = fewshot.summary_scalars(accs)
  assert scalars["fewshot/5shot"] == pytest.approx(np.mean(accs[5]))


def test_separable_features_give_perfect_accuracy():
  centres = 10.0 * np.eye(5)
  rng = np.random.RandomState(3)
  pool_y = np.repeat(np.arange(5), 4)
  pool = centres[pool_y] + 0.1 * rng.randn(20, 5)
  assert fewshot.ridge_accuracy(pool[::4], pool_y[::4], centres, np.arange(5), 5) == 1.0


def tiny_config():
  c = base_config()
  c.model.pretrained = False
  c.model.kwargs = ml_collections.ConfigDict({"width_mult": 0.25})
  c.data.name = "digits"
  c.data.image_size = 32
  c.data.eval_crop = "resize"
  c.eval_batch_size = 128
  c.fewshot = ml_collections.ConfigDict({"every_steps": 4, "shots": (1, 3), "draws": 2,
                                         "l2_reg": 1.0})
  return c


class RecordingWriter:
  def __init__(self):
    self.written = []

  def write_scalars(self, step, scalars):
    self.written.append((step, scalars))


def test_evaluator_features_are_what_the_head_reads(tmp_path):
  config = tiny_config()
  pp = train.preprocessing(config)
  pipe = data.build(config.data, batch_size=16, eval_batch_size=128, seed=0, mean=pp["mean"],
                    std=pp["std"])
  module, variables = train.create_module(config, 10)
  evaluator = fewshot.maybe_evaluator(config, module, pipe)
  assert len(evaluator.fewshot.needed) <= 10 * (1 + 3) * 2
  state = steps.create_state(variables, optax.identity())
  scalars = evaluator(state)
  assert set(scalars) == {"fewshot/1shot", "fewshot/1shot_std", "fewshot/3shot",
                          "fewshot/3shot_std", "fewshot/seconds"}
  # The same numbers from the pieces: eval features of the whole split, in order.
  batch = next(pipe.eval_batches())
  feats = fewshot.extract(evaluator.features_fn, variables, pipe, "eval", np.arange(128),
                          pp["mean"], pp["std"], batch_size=128)
  head = variables["params"]["head"]
  logits = np.asarray(module.apply(variables, batch["image"]))
  np.testing.assert_allclose(feats @ np.asarray(head["kernel"]) + np.asarray(head["bias"]),
                             logits, rtol=1e-4, atol=1e-5)
  np.testing.assert_array_equal(fewshot.split_labels(pipe, "eval")[:128], batch["label"])
  again = fewshot.summary_scalars(evaluator.fewshot.measure(evaluator.features_fn, variables))
  for key, value in again.items():
    assert scalars[key] == pytest.approx(value, abs=1e-12)  # Seeded: the same draws again.
  assert 0.1 <= scalars["fewshot/1shot"] <= 1.0
  # In the training loop: only every `every_steps` steps, to TensorBoard and fewshot.jsonl.
  writer = RecordingWriter()
  assert evaluator.at_step(3, state, writer, tmp_path) is None and not writer.written
  at_4 = evaluator.at_step(4, state, writer, tmp_path)
  assert writer.written == [(4, at_4)] and at_4["fewshot/3shot"] == scalars["fewshot/3shot"]
  line = json.loads((tmp_path / "fewshot.jsonl").read_text())
  assert line["step"] == 4 and line["fewshot/1shot"] == scalars["fewshot/1shot"]
  config.fewshot.every_steps = 0
  assert fewshot.maybe_evaluator(config, module, pipe) is None  # Off by default.


def test_non_classification_datasets_fail_clearly():
  class Pipe:
    label_kind = "mask"
    config = ml_collections.ConfigDict({"name": "mask_folder"})
  with pytest.raises(ValueError, match="label_kind 'mask'"):
    fewshot.split_labels(Pipe(), "train")
