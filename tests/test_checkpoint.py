"""Checkpoints: damaged or partial saves, full disk, another model's checkpoint, init_from."""
import errno
import logging
import shutil

import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from tlflax import checkpoint, steps


def state_of(classes=3, value=1.0):
  variables = {"params": {"backbone": {"kernel": jnp.full((2, 4), value)},
                          "head": {"kernel": jnp.full((4, classes), value),
                                   "bias": jnp.zeros(classes)}},
               "batch_stats": {"backbone": {"mean": jnp.full((4,), value)}}}
  return steps.create_state(variables, optax.sgd(0.1, momentum=0.9))


def saved(tmp_path, steps_values=((2, 2.0), (4, 4.0))):
  ckpt = checkpoint.Checkpointer(tmp_path, max_to_keep=5)
  for step, value in steps_values:
    ckpt.save(step, state_of(value=value))
  ckpt.wait()
  return ckpt


def test_leftover_temporary_folder_is_ignored(tmp_path):
  """A kill during a save leaves `<step>.orbax-checkpoint-tmp-*`: never taken for a step."""
  saved(tmp_path).close()
  tmp = tmp_path / "checkpoints" / "6.orbax-checkpoint-tmp-1700000000"
  shutil.copytree(tmp_path / "checkpoints" / "4", tmp)
  for f in tmp.rglob("*"):
    if f.is_file():
      f.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 2])
  ckpt = checkpoint.Checkpointer(tmp_path)
  assert ckpt.latest_step() == 4
  step, state = ckpt.restore_latest(state_of(value=0.0))
  assert step == 4 and float(state.params["head"]["kernel"][0, 0]) == 4.0
  ckpt.close()


@pytest.mark.parametrize("damage", ["truncate_arrays", "truncate_metadata"])
def test_damaged_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, damage, caplog):
  saved(tmp_path).close()
  latest = tmp_path / "checkpoints" / "4" / "default"
  files = ([f for f in latest.rglob("*") if f.is_file() and "/d/" in str(f)]
           if damage == "truncate_arrays" else [latest / "_METADATA"])
  assert files
  for f in files:
    f.write_bytes(f.read_bytes()[:7])
  ckpt = checkpoint.Checkpointer(tmp_path, max_to_keep=5)
  with caplog.at_level(logging.WARNING):
    step, state = ckpt.restore_latest(state_of(value=0.0))
  assert step == 2
  assert float(state.params["head"]["kernel"][0, 0]) == 2.0
  assert "Checkpoint step 4" in caplog.text and "corrupt_checkpoints" in caplog.text
  assert list((tmp_path / "corrupt_checkpoints").iterdir())[0].name.startswith("4-")
  ckpt.save(4, state)  # The run goes on and writes step 4 again.
  ckpt.close()
  assert checkpoint.Checkpointer(tmp_path).all_steps() == [2, 4]


def test_full_disk_says_so_and_keeps_earlier_checkpoints(tmp_path, monkeypatch):
  ckpt = saved(tmp_path, [(2, 2.0)])

  def no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")
  monkeypatch.setattr(ckpt.manager, "save", no_space)
  with pytest.raises(checkpoint.DiskFullError) as error:
    ckpt.save(4, state_of(value=4.0))
  message = str(error.value)
  assert "No space left on device" in message and "step 4" in message
  assert "steps [2]" in message and str(tmp_path / "checkpoints") in message
  monkeypatch.undo()
  ckpt.close()
  step, state = checkpoint.Checkpointer(tmp_path).restore_latest(state_of(value=0.0))
  assert step == 2 and float(state.params["head"]["kernel"][0, 0]) == 2.0


def test_other_head_shape_lists_every_difference_and_the_fix(tmp_path):
  saved(tmp_path).close()
  ckpt = checkpoint.Checkpointer(tmp_path)
  with pytest.raises(checkpoint.CheckpointMismatchError) as error:
    ckpt.restore_latest(state_of(classes=5))
  message = str(error.value)
  assert "shape mismatch: params/head/kernel model (4, 5) checkpoint (4, 3)" in message
  assert "shape mismatch: params/head/bias model (5,) checkpoint (3,)" in message
  assert "opt_state/0/trace/head/kernel" in message  # The momentum slots too.
  assert "params/backbone" not in message
  assert f"--config.init_from={tmp_path}" in message and "init_reinit" in message
  assert ckpt.all_steps() == [2, 4]  # Not mistaken for damage: nothing moved aside.
  ckpt.close()


def test_init_from_is_strict_unless_told_what_to_reinitialise(tmp_path):
  saved(tmp_path).close()
  fresh = {"params": {"backbone": {"kernel": jnp.zeros((2, 4))},
                      "head": {"kernel": jnp.full((4, 5), -1.0), "bias": jnp.zeros(5)}},
           "batch_stats": {"backbone": {"mean": jnp.zeros(4)}}}
  with pytest.raises(checkpoint.CheckpointMismatchError) as error:
    checkpoint.initialise_from(str(tmp_path), fresh)
  assert "params/head/kernel model (4, 5) checkpoint (4, 3)" in str(error.value)
  assert "init_reinit='params/head/.*'" in str(error.value)
  merged, report = checkpoint.initialise_from(str(tmp_path), fresh, reinit=r"params/head/.*")
  assert sorted(report["reinitialised"]) == ["params/head/bias", "params/head/kernel"]
  np.testing.assert_array_equal(merged["params"]["backbone"]["kernel"], 4.0)  # Latest step.
  np.testing.assert_array_equal(merged["batch_stats"]["backbone"]["mean"], 4.0)
  np.testing.assert_array_equal(merged["params"]["head"]["kernel"], -1.0)  # Kept fresh.
  # A step folder works too, and a folder without checkpoints is named in the error.
  merged, _ = checkpoint.initialise_from(str(tmp_path / "checkpoints" / "2"), fresh,
                                         reinit=r"params/head/.*")
  np.testing.assert_array_equal(merged["params"]["backbone"]["kernel"], 2.0)
  with pytest.raises(FileNotFoundError, match="holds no checkpoint"):
    checkpoint.initialise_from(str(tmp_path / "corrupt_checkpoints"), fresh)
