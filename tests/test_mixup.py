"""Mixup / CutMix on device: mixed images, kept-area lam, loss = mixed-target cross-entropy."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tlflax import mixup
from tlflax.tasks import classification


def make_batch(n=4, size=8):
  rng = np.random.RandomState(0)
  return {"image": jnp.asarray(rng.randn(n, size, size, 3), jnp.float32),
          "label": jnp.asarray(rng.randint(0, 5, n), jnp.int32)}


def test_mixup_is_a_convex_combination_with_the_flipped_batch():
  batch = make_batch()
  out = mixup.mix_batch(batch, jax.random.key(3), {"mixup_alpha": 0.4})
  lam = float(out["mix_lam"])
  assert 0.0 < lam < 1.0
  want = lam * batch["image"] + (1 - lam) * batch["image"][::-1]
  np.testing.assert_allclose(out["image"], want, rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(out["mix_label"], batch["label"][::-1])


def test_cutmix_pastes_one_box_and_lam_is_the_kept_fraction():
  batch = make_batch(size=16)
  out = mixup.mix_batch(batch, jax.random.key(1), {"cutmix_alpha": 1.0})
  image, partner = np.asarray(batch["image"]), np.asarray(batch["image"][::-1])
  pasted = np.all(np.asarray(out["image"]) == partner, axis=-1)  # [B, H, W]
  kept = np.all(np.asarray(out["image"]) == image, axis=-1)
  assert np.all(pasted | kept)
  box = pasted[0]
  ys, xs = np.nonzero(box)
  assert box.sum() == (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)  # One rectangle.
  assert np.all(pasted == box[None])  # The same box for every image.
  np.testing.assert_allclose(float(out["mix_lam"]), 1 - box.sum() / box.size, rtol=1e-6)


def test_prob_zero_leaves_the_batch_alone():
  batch = make_batch()
  out = mixup.mix_batch(batch, jax.random.key(0), {"mixup_alpha": 1.0, "prob": 0.0})
  np.testing.assert_array_equal(out["image"], batch["image"])
  assert float(out["mix_lam"]) == 1.0


def test_switch_picks_both_kinds_over_steps():
  batch = make_batch(size=16)
  cfg = {"mixup_alpha": 1.0, "cutmix_alpha": 1.0, "switch_prob": 0.5}
  kinds = set()
  for seed in range(12):
    out = np.asarray(mixup.mix_batch(batch, jax.random.key(seed), cfg)["image"])
    same = np.all(out == np.asarray(batch["image"]), axis=-1)
    kinds.add("cutmix" if same.any() else "mixup")
  assert kinds == {"cutmix", "mixup"}


def test_loss_equals_cross_entropy_on_mixed_targets():
  logits = jnp.asarray(np.random.RandomState(1).randn(4, 5), jnp.float32)
  batch = {"label": jnp.asarray([0, 1, 2, 3]), "mix_label": jnp.asarray([3, 2, 1, 0]),
           "mix_lam": jnp.asarray(0.3)}
  targets = 0.3 * jax.nn.one_hot(batch["label"], 5) + 0.7 * jax.nn.one_hot(batch["mix_label"], 5)
  smoothed = optax.smooth_labels(targets, 0.1)
  want = optax.softmax_cross_entropy(logits, smoothed).mean()
  np.testing.assert_allclose(classification.batch_loss(logits, batch, 0.1), want, rtol=1e-6)


def test_bad_values_and_other_tasks_are_refused():
  with pytest.raises(ValueError, match="negative"):
    mixup.check({"mixup_alpha": -1.0}, "classification")
  with pytest.raises(ValueError, match="probability"):
    mixup.check({"mixup_alpha": 0.2, "prob": 1.5}, "classification")
  with pytest.raises(ValueError, match="segmentation"):
    mixup.check({"cutmix_alpha": 1.0}, "segmentation")


def test_train_step_with_mixup_compiles_once_and_changes_the_update():
  from tlflax import steps
  from tests.test_steps import batch, tiny_setup
  module, variables, tx, labels = tiny_setup()
  plain = jax.jit(steps.make_train_step(module, tx, labels))
  mixed = jax.jit(steps.make_train_step(module, tx, labels,
                                        mixup={"mixup_alpha": 0.4, "cutmix_alpha": 1.0}))
  state_a = state_b = steps.create_state(variables, tx)
  for i in range(2):
    state_a, metrics_a = plain(state_a, batch(i))
    state_b, metrics_b = mixed(state_b, batch(i))
  assert mixed._cache_size() == 1
  assert np.isfinite(float(metrics_b["loss"]))
  assert float(metrics_a["loss"]) != float(metrics_b["loss"])
