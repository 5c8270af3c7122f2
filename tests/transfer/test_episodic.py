"""Episodic meta-transfer: disjoint class sets, episode sampling, prototype head, one compile."""
import math
import re

import flax
import flax.linen as nn
import jax
import ml_collections
import numpy as np
import pytest

from tests.conftest import mobilenet_v2_weight_file
from tlflax import data, train
from tlflax.config import base_config
from tlflax.models.classifier import ImageClassifier
from tlflax.transfer import episodic


def test_class_split_must_be_disjoint_and_in_range():
  assert episodic.class_split(10, (0, 1, 2), [5, 6]) == ((0, 1, 2), (5, 6))
  with pytest.raises(ValueError, match=r"Classes \[2\] are both base and novel"):
    episodic.class_split(10, (0, 1, 2), (2, 3))
  with pytest.raises(ValueError, match=r"novel_classes has \[10\], outside"):
    episodic.class_split(10, (0, 1), (9, 10))
  with pytest.raises(ValueError, match="distinct"):
    episodic.class_split(10, (0, 0), (5,))


def test_episodes_never_mix_base_and_novel_classes():
  rng = np.random.RandomState(0)
  labels = rng.randint(0, 10, size=600)
  base, novel = episodic.class_split(10, range(5), range(5, 10))
  for classes, key in ((base, (0, episodic.TRAIN_STREAM)), (novel, (0, episodic.EVAL_STREAM, 5))):
    sampler = episodic.EpisodeSampler(labels, classes, way=3, shot=5, query=4, key=key)
    seen = set()
    for e in range(200):
      support, query, chosen = sampler.episode(e)
      assert set(chosen.tolist()) <= set(classes) and len(set(chosen.tolist())) == 3
      assert set(labels[support].tolist()) | set(labels[query].tolist()) <= set(classes)
      # Grouped by class, in the order of `chosen`: episode label = position.
      np.testing.assert_array_equal(labels[support], np.repeat(chosen, 5))
      np.testing.assert_array_equal(labels[query], np.repeat(chosen, 4))
      both = np.concatenate([support, query])
      assert len(set(both.tolist())) == len(both)  # Support and query never share an image.
      seen |= set(chosen.tolist())
    assert seen == set(classes)  # Every class of the set is used, no other.
    again = sampler.episode(7)
    for a, b in zip(again, sampler.episode(7)):
      np.testing.assert_array_equal(a, b)  # A pure function of (key, episode).
  a = episodic.EpisodeSampler(labels, novel, 3, 5, 4, key=(0, 0)).episode(0)[0]
  b = episodic.EpisodeSampler(labels, novel, 3, 5, 4, key=(0, 1)).episode(0)[0]
  assert not np.array_equal(a, b)


def test_sampler_rejects_impossible_episodes():
  labels = np.array([0] * 10 + [1] * 3 + [2] * 10)
  with pytest.raises(ValueError, match=r"Classes \{1: 3\}"):
    episodic.EpisodeSampler(labels, (0, 1, 2), way=2, shot=2, query=2, key=(0,))
  with pytest.raises(ValueError, match="way=4 needs 2..3"):
    episodic.EpisodeSampler(labels, (0, 1, 2), way=4, shot=1, query=1, key=(0,))


def test_prototype_logits_match_a_loop_and_ci_formula():
  rng = np.random.RandomState(1)
  support, query = rng.randn(3 * 4, 6), rng.randn(5, 6)
  got = episodic.prototype_logits(support, query, way=3, scale=2.5)
  for c in range(3):
    proto = np.mean([s / np.linalg.norm(s) for s in support[4 * c:4 * c + 4]], axis=0)
    for i, q in enumerate(query):
      cos = q @ proto / (np.linalg.norm(q) * np.linalg.norm(proto))
      assert got[i, c] == pytest.approx(2.5 * cos, abs=1e-12)
  mean, ci = episodic.mean_ci95([0.0, 1.0, 0.5, 0.5])
  assert mean == 0.5 and ci == pytest.approx(1.96 * math.sqrt(0.125) / 2)


def tiny_module():
  c = base_config()
  c.model.pretrained = False
  c.model.kwargs = ml_collections.ConfigDict({"width_mult": 0.25})
  return train.create_module(c, 4)


def tiny_optim():
  c = episodic.episodic_config().optim
  c.lr, c.warmup_steps, c.schedule = 3e-3, 0, "constant"
  c.rules = [(r"proto/.*", 10.0), (r"backbone/features_1[4-8]/.*", 1.0), (".*", "frozen")]
  return c


def test_train_step_compiles_once_and_trains_only_its_rules():
  module, variables = tiny_module()
  way, shot, query = 3, 2, 3
  rng = np.random.RandomState(2)
  images = rng.rand(30, 32, 32, 3).astype(np.float32)
  labels = np.repeat(np.arange(3), 10)
  trainer = episodic.EpisodicTrainer(module, variables, tiny_optim(), way, shot, query,
                                     total_episodes=8, init_scale=5.0)
  sampler = episodic.EpisodeSampler(labels, (0, 1, 2), way, shot, query, key=(0,))
  support, q, _ = sampler.episode(0)
  # The jitted loss equals the numpy prototype head on the model's own features.
  feats = episodic.features_of(module, variables, images[np.concatenate([support, q])], 16)
  logits = episodic.prototype_logits(feats[:way * shot], feats[way * shot:], way, scale=5.0)
  logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
  expected = -np.mean(logp[np.arange(len(q)), np.repeat(np.arange(way), query)])
  loss, _ = episodic.proto_loss(module, trainer.params, trainer.model_state, images[support],
                                images[q], way, shot, query)
  assert float(loss) == pytest.approx(expected, rel=1e-4)
  before = flax.traverse_util.flatten_dict(jax.device_get(trainer.params), sep="/")
  history = trainer.train(images, sampler, episodes=6)
  assert trainer.traces == 1  # Six different episodes, one compilation.
  assert len(history) == 6 and all(np.isfinite(h[0]) for h in history)
  after = flax.traverse_util.flatten_dict(jax.device_get(trainer.params), sep="/")
  for path, value in before.items():
    same = np.asarray(value).tobytes() == np.asarray(after[path]).tobytes()
    if re.fullmatch(r"proto/.*|backbone/features_1[4-8]/.*", path):
      if path.endswith(("kernel", "log_scale")):
        assert not same, path  # Trained: moved.
    else:
      assert same, path  # Frozen: bit-identical.
  assert trainer.scale != pytest.approx(5.0)


class ToyBackbone(nn.Module):
  """One conv: unlike a random-init MobileNetV2 (whose pooled features are ~1e-6 and all
  alike), its features differ between images, so one episode can be fitted."""

  @nn.compact
  def __call__(self, x, train=False):
    return {"stride_32": nn.relu(nn.Conv(16, (3, 3), strides=(2, 2), name="conv")(x))}


def test_repeating_one_episode_lowers_its_loss():
  module = ImageClassifier(backbone=ToyBackbone(), num_classes=2)
  variables = module.init(jax.random.key(0), np.zeros((1, 16, 16, 3), np.float32))
  rng = np.random.RandomState(3)
  support = rng.rand(4, 16, 16, 3).astype(np.float32)
  query = ((rng.rand(4, 16, 16, 3) + np.repeat(support[::2], 2, axis=0)) / 2).astype(np.float32)
  optim = tiny_optim()
  optim.rules = [(r"proto/.*", 10.0), (r"backbone/.*", 1.0), (".*", "frozen")]
  trainer = episodic.EpisodicTrainer(module, variables, optim, way=2, shot=2, query=2,
                                     total_episodes=30)
  losses = [trainer.step(support, query)[0] for _ in range(25)]
  assert losses[-1] < 0.6 * losses[0], losses  # Measured: 0.688 -> 0.379.
  assert trainer.traces == 1


def test_frozen_imagenet_prototypes_on_novel_digits():
  """The baseline on real data: 5-way 5-shot on digits 5-9, far above chance (0.2)."""
  mobilenet_v2_weight_file()
  c = base_config()
  c.data.name, c.data.image_size, c.data.eval_crop = "digits", 48, "resize"
  pp = train.preprocessing(c)
  pipe = data.build(c.data, batch_size=1, eval_batch_size=64, mean=pp["mean"], std=pp["std"])
  x, y = episodic.class_pool(pipe, ["eval"], range(5, 10), pp["mean"], pp["std"])
  assert set(y.tolist()) == set(range(5, 10)) and len(y) == 180
  module, variables = train.create_module(c, 10)
  feats = episodic.features_of(module, variables, x)
  sampler = episodic.EpisodeSampler(y, range(5, 10), 5, 5, 10, key=(0, episodic.EVAL_STREAM))
  accs = episodic.evaluate(feats, sampler, 30, "prototype")
  mean, ci = episodic.mean_ci95(accs)
  assert 0.55 < mean and ci < 0.05, (mean, ci)
  assert episodic.evaluate(feats, sampler, 30, "ridge").mean() > 0.55
