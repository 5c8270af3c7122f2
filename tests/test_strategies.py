"""Stage strategies: last-N-stages rules, layer-wise lr decay, gradual unfreezing (one compile)."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from tlflax import config as config_lib
from tlflax import models, optim, steps, strategies, train
from tlflax.pretrained.load import flatten
from tests.test_steps import batch

MNV2_STAGES = ["stem", "stage1", "stage2", "stage3", "stage4", "stage5"]


def tiny_config(**optim_fields):
  config = config_lib.base_config()
  config.model.pretrained = False
  config.model.kwargs = ml_collections.ConfigDict({"width_mult": 0.25})
  config.model.bn_mode = "frozen"
  config.optim.update(optim_fields)
  return config


def labels_by_path(config, total_steps=10):
  module, variables = train.build_model(config, num_classes=3, num_steps=total_steps)
  tx, labels, _ = optim.make(config.optim, variables["params"], total_steps,
                             model_name=config.model.name)
  paths = optim.parameter_paths(labels)
  return module, variables, tx, labels, dict(zip(paths, jax.tree_util.tree_leaves(labels)))


@pytest.mark.parametrize("name", sorted(models.MODELS.names()))
def test_named_stages_cover_every_backbone_parameter_once(name):
  """Each family's stage regexes partition its backbone: no parameter in none or two."""
  spec = models.MODELS.get(name)
  module = spec.backbone()
  shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros(
      (1, max(spec.init_size, 32), max(spec.init_size, 32), 3)), train=False))
  import re
  for path in optim.parameter_paths(shapes["params"]):
    hits = [s for s, rx in spec.stages if re.fullmatch(f"({rx})/.*", path)]
    assert len(hits) == 1, (name, path, hits)


def test_train_last_stages_freezes_by_depth():
  assert [s for s, _ in strategies.named_stages("mobilenet_v2")] == MNV2_STAGES
  *_, by_path = labels_by_path(tiny_config(train_last_stages=2))
  assert by_path["head/kernel"] == "lr_x1"
  assert by_path["backbone/features_18/conv/kernel"] == "lr_x1"  # stage5
  assert by_path["backbone/features_10/project/conv/kernel"] == "lr_x1"  # stage4
  assert by_path["backbone/features_6/project/conv/kernel"] == "frozen"  # stage3
  assert by_path["backbone/features_0/conv/kernel"] == "frozen"  # stem
  # 0 stages is the linear probe: only the head trains.
  *_, linear = labels_by_path(tiny_config(train_last_stages=0))
  assert {p for p, v in linear.items() if v != "frozen"} == {"head/kernel", "head/bias"}


def test_layer_decay_multipliers_follow_depth():
  *_, by_path = labels_by_path(tiny_config(layer_decay=0.5))
  assert by_path["head/kernel"] == "lr_x1"
  assert by_path["backbone/features_18/conv/kernel"] == "lr_x0.5"
  assert by_path["backbone/features_10/project/conv/kernel"] == "lr_x0.25"
  assert by_path["backbone/features_0/conv/kernel"] == f"lr_x{0.5 ** 6:g}"


def test_layer_decay_updates_are_scaled_exactly():
  """SGD, constant lr: a stage's update is exactly decay^(depth+1) times the head's rate."""
  config = tiny_config(name="sgd", lr=0.5, schedule="constant", layer_decay=0.7, weight_decay=0.0)
  _, variables, tx, labels, by_path = labels_by_path(config)
  params = variables["params"]
  grads = jax.tree_util.tree_map(jnp.ones_like, params)
  updates = flatten(tx.update(grads, tx.init(params), params)[0])
  assert np.all(updates["head/kernel"] == -0.5)
  np.testing.assert_array_equal(updates["backbone/features_14/project/conv/kernel"],
                                np.float32(-0.5 * 0.7))
  np.testing.assert_array_equal(updates["backbone/features_0/conv/kernel"],
                                np.float32(-0.5 * 0.7 ** 6))


def test_strategy_and_hand_written_rules_conflict():
  config = tiny_config(train_last_stages=1, rules=[(".*", 0.5)])
  with pytest.raises(ValueError, match="leave optim.rules at its default"):
    labels_by_path(config)
  with pytest.raises(ValueError, match="has 6 named stages"):
    labels_by_path(tiny_config(train_last_stages=7))


def test_unfreeze_schedule_top_stage_first():
  schedule = strategies.unfreeze_schedule("mobilenet_v2", every=4, total_steps=100)
  starts = [start for _, start in schedule]
  assert starts == [4, 8, 12, 16, 20, 24]  # stage5 ... stem
  schedule = strategies.unfreeze_schedule("mobilenet_v2", every=0.25, total_steps=40,
                                          start_trainable=2)
  assert [s for _, s in schedule] == [0, 0, 10, 20, 30, 40]


def test_gradual_unfreezing_switches_at_the_right_steps_and_compiles_once():
  """stage5 trains from step 2, stage4 from step 4; stem..stage3 (turn >= 6 steps) never:
  frozen with no optimizer state. Gated groups are bit-identical until their step."""
  total = 6
  config = tiny_config(name="adam", lr=1e-2, unfreeze_every=2, weight_decay=0.0)
  module, variables, tx, labels, by_path = labels_by_path(config, total)
  assert by_path["head/kernel"] == "lr_x1"
  assert by_path["backbone/features_18/conv/kernel"] == "lr_x1_from2"
  assert by_path["backbone/features_10/project/conv/kernel"] == "lr_x1_from4"
  assert by_path["backbone/features_6/project/conv/kernel"] == "frozen"
  state = steps.create_state(variables, tx)
  step = jax.jit(steps.make_train_step(module, tx, labels), donate_argnums=0)
  history = [flatten(jax.device_get(state.params))]
  for i in range(total):
    state, _ = step(state, batch(i))
    history.append(flatten(jax.device_get(state.params)))
  assert step._cache_size() == 1

  def moved(path, i):  # Did step i+1 (params after i+1 steps vs after i) change `path`?
    return not np.array_equal(history[i][path], history[i + 1][path])
  head, s5, s4, s3 = ("head/kernel", "backbone/features_18/conv/kernel",
                      "backbone/features_10/project/conv/kernel",
                      "backbone/features_6/project/conv/kernel")
  assert [moved(head, i) for i in range(total)] == [True] * 6
  assert [moved(s5, i) for i in range(total)] == [False, False, True, True, True, True]
  assert [moved(s4, i) for i in range(total)] == [False] * 4 + [True, True]
  assert not any(moved(s3, i) for i in range(total))


def test_gated_group_starts_like_a_fresh_optimizer():
  """The first update after unfreezing equals a fresh Adam's first update (bias correction and
  the schedule's step are held while gated), not a 3x larger one from zero moments."""
  params = {"w": jnp.ones((3,))}
  sched = lambda count: 0.1 * (count + 1.0)  # Depends on the global step.
  cfg = config_lib.optim_config()
  cfg.name, cfg.weight_decay = "adam", 0.0
  gated = optim.gated(optim.base_optimizer(cfg, lambda c: sched(c + 3)), start=3)
  fresh = optim.base_optimizer(cfg, lambda c: sched(c + 3))
  state = gated.init(params)
  grads = {"w": jnp.asarray([1.0, -2.0, 0.5])}
  for _ in range(3):
    upd, state = gated.update(grads, state, params)
    np.testing.assert_array_equal(upd["w"], 0.0)
  upd, _ = gated.update(grads, state, params)
  want, _ = fresh.update(grads, fresh.init(params), params)
  np.testing.assert_array_equal(upd["w"], want["w"])


def test_unfreeze_of_a_frozen_parameter_is_an_error():
  config = tiny_config(rules=[("head/.*", 1.0), (".*", "frozen")],
                       unfreeze=[("backbone/.*", 2)])
  with pytest.raises(ValueError, match="optim.rules freezes them"):
    labels_by_path(config)


def test_l1_and_l2_penalties_add_to_the_gradient_on_kernels_only():
  cfg = config_lib.optim_config()
  cfg.update(name="sgd", lr=1.0, schedule="constant", l1=0.1, l2=0.01)
  params = {"head": {"kernel": jnp.asarray([[2.0, -3.0]]), "bias": jnp.asarray([5.0, -5.0])}}
  tx, _, _ = optim.make(cfg, params, 10)
  grads = jax.tree_util.tree_map(jnp.zeros_like, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_allclose(updates["head"]["kernel"],
                             -np.asarray([[0.1 + 0.02, -0.1 - 0.03]]), rtol=1e-6)
  np.testing.assert_array_equal(updates["head"]["bias"], 0.0)
