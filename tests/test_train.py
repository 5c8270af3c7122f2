"""End-to-end: `python -m tlflax.main` on real files, resume, overrides, workdir contents."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp

from tests.conftest import REPO, mobilenet_v2_weight_file, shared_data
from tests.tiny import tiny_digits_config
from tlflax import train
from tlflax.pretrained.load import flatten


def saved_params(workdir: Path, step: int):
  with ocp.StandardCheckpointer() as ckptr:
    restored = ckptr.restore(workdir / "checkpoints" / str(step) / "default")
  return flatten({"params": restored["params"], "model_state": restored["model_state"]})


def test_resume_is_identical_to_an_uninterrupted_run(tmp_path):
  straight, resumed = tmp_path / "straight", tmp_path / "resumed"
  summary = train.run(tiny_digits_config(), str(straight))
  train.run(tiny_digits_config(), str(resumed))
  # Simulate a run killed after step 2: drop the last checkpoint and its eval line.
  shutil.rmtree(resumed / "checkpoints" / "4")
  lines = (resumed / "metrics.jsonl").read_text().splitlines()
  (resumed / "metrics.jsonl").write_text("\n".join(lines[:1]) + "\n")
  summary_resumed = train.run(tiny_digits_config(), str(resumed))
  a, b = saved_params(straight, 4), saved_params(resumed, 4)
  assert a.keys() == b.keys()
  for key in a:
    assert np.asarray(a[key]).tobytes() == np.asarray(b[key]).tobytes(), key
  assert summary == summary_resumed


def test_workdir_contents_and_metrics(tmp_path):
  summary = train.run(tiny_digits_config(), str(tmp_path))
  history = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [h["step"] for h in history] == [2, 4]
  saved = json.loads((tmp_path / "summary.json").read_text())
  assert saved == summary
  assert saved["eval/accuracy"] == history[-1]["eval/accuracy"]  # Final, not best.
  assert saved["eval/num_examples"] == 360  # Every val image once (360 = 2 * 128 + 104).
  report = json.loads((tmp_path / "eval_report.json").read_text())
  confusion = np.array(report["confusion_matrix"])
  assert confusion.sum() == 360 and confusion.shape == (10, 10)
  assert np.isclose(np.trace(confusion) / 360, saved["eval/accuracy"])
  info = json.loads((tmp_path / "run_info.json").read_text())
  assert info["class_names"] == [str(i) for i in range(10)]
  assert info["versions"]["jax"] == jax.__version__
  assert info["preprocessing"]["image_size"] == 32 and "git_commit" in info
  assert json.loads((tmp_path / "config.json").read_text())["optim"]["lr"] == 0.05
  assert list(tmp_path.glob("events.out.tfevents.*"))  # TensorBoard.
  # A finished run is not trained again: re-running gives the same summary.
  assert train.run(tiny_digits_config(), str(tmp_path)) == summary


def run_main(*args, cwd=REPO):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "tlflax.main", *args], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=600)


def test_main_on_hymenoptera_with_overrides(tmp_path):
  """The real command on real photos (including the GIF placeholder) for a few steps."""
  shared_data("hymenoptera")
  mobilenet_v2_weight_file()
  result = run_main("--config", "configs/hymenoptera.py:linear", "--workdir", str(tmp_path),
                    "--config.total_steps=3", "--config.data.image_size=64",
                    "--config.batch_size=8", "--config.optim.lr=0.02")
  assert result.returncode == 0, result.stderr[-3000:]
  summary = json.loads((tmp_path / "summary.json").read_text())
  assert summary["step"] == 3 and summary["eval/num_examples"] == 153
  assert 0.0 <= summary["eval/accuracy"] <= 1.0
  config = json.loads((tmp_path / "config.json").read_text())
  assert config["optim"]["lr"] == 0.02 and config["data"]["image_size"] == 64
  info = json.loads((tmp_path / "run_info.json").read_text())
  assert info["class_names"] == ["ants", "bees"]
  assert any("imageNotFound.gif" in path for path, _ in info["skipped_files"])


def test_unknown_override_is_rejected(tmp_path):
  result = run_main("--config", "configs/quickstart.py", "--workdir", str(tmp_path),
                    "--config.optim.lrr=0.1")
  assert result.returncode != 0
  assert "Unknown config field 'optim.lrr'" in result.stderr
  assert "Did you mean: optim.lr?" in result.stderr
