"""Train step: exact freezing, BatchNorm modes, and data parallelism over 8 devices."""
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from tlflax import config as config_lib
from tlflax import optim, steps, train
from tlflax.pretrained.load import flatten

RULES = [(r"head/.*", 1.0), (r"backbone/features_(1[4-8])/.*", 0.5), (r"backbone/.*", "frozen")]


def tiny_setup(rules=RULES, bn_mode="follow_params", seed=0):
  config = config_lib.base_config()
  config.seed = seed
  config.model.pretrained = False
  config.model.kwargs = ml_collections.ConfigDict({"width_mult": 0.25})
  config.model.bn_mode = bn_mode
  config.optim.rules = rules
  config.optim.weight_decay = 1e-3  # Decay must not leak into frozen tensors either.
  module, variables = train.build_model(config, num_classes=3)
  tx, labels, _ = optim.make(config.optim, variables["params"], 10)
  return module, variables, tx, labels


def batch(seed=0, n=8):
  rng = np.random.RandomState(seed)
  return {"image": rng.randn(n, 32, 32, 3).astype(np.float32),
          "label": rng.randint(0, 3, n).astype(np.int32)}


def run_steps(module, variables, tx, labels, n=3):
  state = steps.create_state(variables, tx)
  step = jax.jit(steps.make_train_step(module, tx, labels))
  for i in range(n):
    state, _ = step(state, batch(i))
  return state


def test_frozen_parameters_stay_bit_identical_and_others_move():
  module, variables, tx, labels = tiny_setup()
  # A -0.0 in a frozen kernel: `p + 0.0` would silently turn it into +0.0.
  variables["params"]["backbone"]["features_0"]["conv"]["kernel"] = (
      variables["params"]["backbone"]["features_0"]["conv"]["kernel"].at[0, 0, 0, 0].set(-0.0))
  state = run_steps(module, variables, tx, labels)
  before, after = flatten(variables["params"]), flatten(state.params)
  label_of = dict(zip(optim.parameter_paths(labels), jax.tree_util.tree_leaves(labels)))
  for path, value in before.items():
    same = np.asarray(value).tobytes() == np.asarray(after[path]).tobytes()
    assert same == (label_of[path] == "frozen"), path
  assert np.signbit(after["backbone/features_0/conv/kernel"][0, 0, 0, 0])


def test_bn_follow_params_freezes_statistics_of_frozen_layers_only():
  module, variables, tx, labels = tiny_setup(bn_mode="follow_params")
  state = run_steps(module, variables, tx, labels)
  before = flatten(variables["batch_stats"])
  after = flatten(state.model_state["batch_stats"])
  for path in before:
    changed = not np.array_equal(before[path], after[path])
    trainable_layer = path.startswith(("backbone/features_14", "backbone/features_15",
                                       "backbone/features_16", "backbone/features_17",
                                       "backbone/features_18"))
    assert changed == trainable_layer, path


@pytest.mark.parametrize("bn_mode,expect_change", [("frozen", False), ("train", True)])
def test_bn_modes(bn_mode, expect_change):
  module, variables, tx, labels = tiny_setup(bn_mode=bn_mode)
  state = run_steps(module, variables, tx, labels, n=1)
  before = flatten(variables["batch_stats"])
  after = flatten(state.model_state["batch_stats"])
  assert all((not np.array_equal(before[p], after[p])) == expect_change for p in before)


def test_unknown_bn_mode():
  with pytest.raises(ValueError, match="bn_mode"):
    tiny_setup(bn_mode="freeze")


MULTI_DEVICE = textwrap.dedent("""
    import numpy as np, jax
    from tests.test_steps import tiny_setup, batch
    from tlflax import sharding, steps
    module, variables, tx, labels = tiny_setup(bn_mode="train")
    mesh = sharding.make_mesh()
    state = sharding.replicate(steps.create_state(variables, tx), mesh)
    step = jax.jit(steps.make_train_step(module, tx, labels))
    for i in range(2):
      state, metrics = step(state, sharding.put_batch(batch(i), sharding.batch_sharding(mesh)))
    leaves = jax.tree_util.tree_leaves(jax.device_get((state.params, state.model_state)))
    np.savez(OUT, *leaves, loss=np.asarray(metrics["loss"]), devices=jax.device_count())
""")


def run_in_subprocess(devices: int, out: str):
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  code = f"OUT = {out!r}\n" + MULTI_DEVICE
  subprocess.run([sys.executable, "-c", code], env=env, check=True,
                 cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  return np.load(out)


def test_eight_devices_match_one_device(tmp_path):
  """Data parallel over 8 (fake CPU) devices computes the same step as 1 device."""
  one = run_in_subprocess(1, str(tmp_path / "one.npz"))
  eight = run_in_subprocess(8, str(tmp_path / "eight.npz"))
  assert int(one["devices"]) == 1 and int(eight["devices"]) == 8
  keys = [k for k in one.files if k.startswith("arr_")]
  a = np.concatenate([eight[k].ravel() for k in keys])
  b = np.concatenate([one[k].ravel() for k in keys])
  # Norm-wise over all parameters and statistics: equal up to float32 summation order.
  assert np.linalg.norm(a - b) / np.linalg.norm(b) < 1e-5
  np.testing.assert_allclose(one["loss"], eight["loss"], rtol=1e-5)


def test_train_step_compiles_once():
  """No retracing after the first step (same shapes, donated state, step as an array)."""
  module, variables, tx, labels = tiny_setup()
  state = steps.create_state(variables, tx)
  step = jax.jit(steps.make_train_step(module, tx, labels), donate_argnums=0)
  for i in range(3):
    state, metrics = step(state, batch(i))
  assert step._cache_size() == 1
