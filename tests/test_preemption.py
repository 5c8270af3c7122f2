"""Preemption: `python -m tlflax.main` killed (SIGKILL) or stopped (SIGTERM) at a random step
and run again ends with the parameters of an uninterrupted run, bit for bit."""
import json
import os
import random
import signal
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import REPO
from tests.test_train import saved_params

TOTAL = 8
CONFIG = f"""
from tests.tiny import tiny_digits_config


def get_config(arg=None):
  c = tiny_digits_config({TOTAL})
  c.eval_every_steps = 4
  c.log_every_steps = 2
  return c
"""

# Runs `python -m tlflax.main ARGS` and sends itself SIG once train step K has been dispatched
# (K = 0: never): a kill at a chosen step, with the real command's code path.
CHILD = """
import inspect, os, runpy, sys
K, SIG = int(sys.argv[1]), int(sys.argv[2])
sys.argv = ["tlflax.main"] + sys.argv[3:]
from tlflax import train
loop = train.train_loop

def patched(*args, **kwargs):
  bound = inspect.signature(loop).bind(*args, **kwargs)
  done, inner = [bound.arguments["start"]], bound.arguments["train_step"]
  def train_step(state, batch):
    out = inner(state, batch)
    done[0] += 1
    if done[0] == K:
      os.kill(os.getpid(), SIG)
    return out
  bound.arguments["train_step"] = train_step
  return loop(*bound.args, **bound.kwargs)

train.train_loop = patched
runpy.run_module("tlflax.main", run_name="__main__", alter_sys=True)
"""


def main(workdir, config, kill_at=0, sig=signal.SIGKILL):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-c", CHILD, str(kill_at), str(int(sig)), "--config",
                         str(config), "--workdir", str(workdir)], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=900)


def checkpoint_steps(workdir):
  folder = workdir / "checkpoints"
  return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.exists() else []


def max_difference(a, b):
  assert a.keys() == b.keys()
  return max(float(np.max(np.abs(np.asarray(a[k], np.float64) - np.asarray(b[k], np.float64))))
             if np.size(a[k]) else 0.0 for k in a)


def bit_identical(a, b):
  return all(np.asarray(a[k]).tobytes() == np.asarray(b[k]).tobytes() for k in a)


@pytest.fixture(scope="module")
def config_file(tmp_path_factory):
  path = tmp_path_factory.mktemp("config") / "tiny_digits.py"
  path.write_text(CONFIG)
  return path


@pytest.fixture(scope="module")
def straight(tmp_path_factory, config_file):
  """The uninterrupted run (same command, checkpoints at the same cadence)."""
  workdir = tmp_path_factory.mktemp("straight")
  result = main(workdir, config_file)
  assert result.returncode == 0, result.stderr[-3000:]
  return saved_params(workdir, TOTAL)


def test_sigkill_at_a_random_step_then_resume_is_bit_identical(tmp_path, config_file, straight):
  kill_at = random.Random().randint(3, TOTAL - 1)  # After the first checkpoint (step 2).
  killed = main(tmp_path, config_file, kill_at, signal.SIGKILL)
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
  survived = checkpoint_steps(tmp_path)
  assert all(s <= kill_at for s in survived)
  resumed = main(tmp_path, config_file)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "stale lock" in resumed.stderr  # The killed run's lock was taken over.
  params = saved_params(tmp_path, TOTAL)
  difference = max_difference(params, straight)
  print(f"\nSIGKILL after step {kill_at}: resumed from step {max(survived, default=0)}; "
        f"max |param difference| vs uninterrupted = {difference}")
  assert bit_identical(params, straight), difference
  steps = [json.loads(l)["step"] for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert steps == [4, 8]  # One line per eval, none repeated by the resume.


def test_sigterm_saves_the_last_completed_step_and_resumes_bit_identical(
    tmp_path, config_file, straight):
  stop_at = random.Random().choice([1, 3, 5, 7])  # Between the regular checkpoints.
  stopped = main(tmp_path, config_file, stop_at, signal.SIGTERM)
  assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-3000:]
  assert f"Stopped by SIGTERM after step {stop_at}" in stopped.stderr
  assert f"resume at step {stop_at}" in stopped.stderr
  saved = checkpoint_steps(tmp_path)
  steps_lost = stop_at - max(saved)
  assert steps_lost == 0, saved
  assert not list((tmp_path / "checkpoints").glob("*orbax-checkpoint-tmp*"))  # Save finished.
  resumed = main(tmp_path, config_file)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "stale lock" not in resumed.stderr  # A clean exit leaves no stale lock.
  params = saved_params(tmp_path, TOTAL)
  difference = max_difference(params, straight)
  print(f"\nSIGTERM after step {stop_at}: checkpoint step {max(saved)}, steps lost "
        f"{steps_lost}; max |param difference| vs uninterrupted = {difference}")
  assert bit_identical(params, straight), difference
