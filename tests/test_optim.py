"""Rules -> labels, schedules and optimizers."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from tlflax import config as config_lib
from tlflax import optim

PARAMS = {"backbone": {"features_0": {"conv": {"kernel": jnp.ones((3, 3, 3, 4))},
                                      "bn": {"scale": jnp.ones(4), "bias": jnp.zeros(4)}},
                       "features_1": {"conv": {"kernel": jnp.ones((1, 1, 4, 4))}}},
          "head": {"kernel": jnp.ones((4, 2)), "bias": jnp.zeros(2)}}


def test_first_full_match_wins():
  rules = [("backbone/features_0/.*", "frozen"), ("backbone/.*", 0.1), ("head/kernel", 2.0),
           (".*", 1.0)]
  values = optim.assign(optim.parameter_paths(PARAMS), rules)
  assert values == {"backbone/features_0/bn/bias": "frozen", "backbone/features_0/bn/scale": "frozen",
                    "backbone/features_0/conv/kernel": "frozen",
                    "backbone/features_1/conv/kernel": 0.1, "head/bias": 1.0, "head/kernel": 2.0}


def test_partial_match_is_not_a_match_and_uncovered_is_an_error():
  with pytest.raises(ValueError, match="match no rule"):
    optim.assign(optim.parameter_paths(PARAMS), [("head", 1.0), ("backbone/.*", 1.0)])


def test_bad_rule_values():
  with pytest.raises(ValueError, match="frozen"):
    optim.assign(["a"], [("a", "freeze")])
  with pytest.raises(ValueError, match="negative"):
    optim.assign(["a"], [("a", -1)])
  assert optim.assign(["a"], [("a", 0)]) == {"a": "frozen"}


def make_cfg(**kw):
  cfg = config_lib.optim_config()
  cfg.update(kw)
  return cfg


def test_frozen_parameters_have_no_optimizer_state():
  cfg = make_cfg(name="adam", rules=[("head/.*", 1.0), (".*", "frozen")])
  tx, labels, _ = optim.make(cfg, PARAMS, 10)
  state = tx.init(PARAMS)
  # Adam keeps mu and nu per trainable tensor (the 2 head tensors) plus scalar step
  # counts (Adam's and the schedule's); nothing for the 4 frozen backbone tensors.
  tensors = sorted(x.size for x in jax.tree_util.tree_leaves(state) if x.ndim)
  assert tensors == [2, 2, 8, 8]


def test_lr_multipliers_scale_updates():
  cfg = make_cfg(name="sgd", lr=0.5, schedule="constant",
                 rules=[("head/kernel", 2.0), ("head/bias", 1.0), (".*", "frozen")])
  tx, _, _ = optim.make(cfg, PARAMS, 10)
  grads = jax.tree_util.tree_map(jnp.ones_like, PARAMS)
  updates, _ = tx.update(grads, tx.init(PARAMS), PARAMS)
  np.testing.assert_allclose(updates["head"]["kernel"], -1.0)
  np.testing.assert_allclose(updates["head"]["bias"], -0.5)
  np.testing.assert_array_equal(updates["backbone"]["features_1"]["conv"]["kernel"], 0.0)


def test_weight_decay_skips_norms_and_biases():
  cfg = make_cfg(name="sgd", lr=1.0, schedule="constant", weight_decay=0.1, rules=[(".*", 1.0)])
  tx, _, _ = optim.make(cfg, PARAMS, 10)
  zeros = jax.tree_util.tree_map(jnp.zeros_like, PARAMS)
  updates, _ = tx.update(zeros, tx.init(PARAMS), PARAMS)
  np.testing.assert_allclose(updates["head"]["kernel"], -0.1)
  np.testing.assert_array_equal(updates["head"]["bias"], 0.0)
  np.testing.assert_array_equal(updates["backbone"]["features_0"]["bn"]["scale"], 0.0)


@pytest.mark.parametrize("name", ["sgd", "momentum", "nesterov", "rmsprop", "adam", "adamw"])
def test_every_optimizer_builds_and_steps(name):
  tx, _, _ = optim.make(make_cfg(name=name), PARAMS, 10)
  updates, _ = tx.update(jax.tree_util.tree_map(jnp.ones_like, PARAMS), tx.init(PARAMS), PARAMS)
  assert np.all(np.asarray(updates["head"]["kernel"]) != 0) or name == "sgd"


def test_schedules():
  cos = optim.make_schedule(make_cfg(lr=1.0, schedule="cosine", warmup_steps=10), 110)
  np.testing.assert_allclose([cos(0), cos(5), cos(10), cos(60), cos(110)],
                             [0.0, 0.5, 1.0, 0.5, 0.0], atol=1e-6)
  step = optim.make_schedule(make_cfg(lr=1.0, schedule="step", step_boundaries=(0.5,),
                                      decay_factor=0.1), 100)
  np.testing.assert_allclose([step(49), step(51)], [1.0, 0.1], atol=1e-6)
  with pytest.raises(ValueError, match="schedule"):
    optim.make_schedule(make_cfg(schedule="linear"), 10)
