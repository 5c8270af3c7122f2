"""`python -m tlflax.rank`: candidate planning, ranking, and the command end-to-end on digits."""
import csv
import math
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO, mobilenet_v2_weight_file
from tlflax import rank
from tlflax.transfer import features


def test_plan_skips_missing_weights_with_reason_and_adds_controls(monkeypatch, tmp_path):
  monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # An empty hub cache.
  monkeypatch.delenv("TLFLAX_WEIGHTS_DIR", raising=False)
  (tmp_path / "w").mkdir()
  (tmp_path / "w" / "resnet18-f37072fd.pth").write_bytes(b"")  # Only resnet18 is "here".
  chosen, skipped = rank.plan(["resnet18", "resnet50.tv2_in1k", "resnet18.tv_in1k"], True,
                              str(tmp_path / "w"), download=False)
  assert chosen == [features.Candidate("resnet18", "resnet18.tv_in1k"),
                    features.Candidate("resnet18", features.RANDOM)]
  assert [tag for tag, _ in skipped] == ["resnet50.tv2_in1k"]
  assert "resnet50-11ad3fa6.pth is not on this machine" in skipped[0][1]
  assert "--download" in skipped[0][1]


def test_unknown_candidates_are_named():
  with pytest.raises(ValueError, match="'resnet7' is not a registered model"):
    rank.weight_tag("resnet7")
  with pytest.raises(KeyError, match="Unknown pretrained weight 'mobilenet_v2.nope'"):
    rank.weight_tag("mobilenet_v2.nope")
  with pytest.raises(ValueError, match="is for model 'resnet18', not 'mobilenet_v2'"):
    rank.weight_tag("mobilenet_v2.resnet18.tv_in1k")


def test_explicit_random_control_needs_no_weight_file(monkeypatch, tmp_path):
  monkeypatch.setenv("TORCH_HOME", str(tmp_path))
  chosen, skipped = rank.plan(["vgg11.random", "vgg11"], True, None, download=False)
  assert chosen == [features.Candidate("vgg11", features.RANDOM)]
  assert [tag for tag, _ in skipped] == ["vgg11.tv_in1k"]


def test_add_ranks_orders_by_logme_and_ranks_each_score():
  rows = [{"logme": 0.1, "leep": math.nan, "knn_acc": 0.9, "ridge_acc": 0.5},
          {"logme": 0.7, "leep": -2.0, "knn_acc": 0.8, "ridge_acc": 0.6},
          {"logme": -0.3, "leep": -1.0, "knn_acc": 0.7, "ridge_acc": 0.7}]
  ranked = rank.add_ranks(rows)
  assert [r["logme"] for r in ranked] == [0.7, 0.1, -0.3]
  assert [r["rank"] for r in ranked] == [1, 2, 3]
  assert [r["rank_leep"] for r in ranked] == [2, 3, 1]  # NaN last.
  assert [r["rank_knn_acc"] for r in ranked] == [2, 1, 3]
  assert [r["rank_ridge_acc"] for r in ranked] == [2, 3, 1]


def test_rank_command_on_digits_puts_random_control_last(tmp_path):
  mobilenet_v2_weight_file()  # Skips when the ImageNet weight is not installed.
  out = tmp_path / "rank"
  env = dict(os.environ, JAX_PLATFORMS="cpu", TLFLAX_OFFLINE="1",
             TLFLAX_CACHE_DIR=str(tmp_path / "cache"))
  proc = subprocess.run(
      [sys.executable, "-m", "tlflax.rank", "--config", "configs/quickstart.py",
       "--config.data.image_size=32", "--out", str(out),
       "--candidates", "mobilenet_v2,resnet50.tv2_in1k", "--depths", "stride_16,stride_32",
       "--batch_size", "128"], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "Skipping resnet50.tv2_in1k: weight file" in proc.stderr
  for name in ("ranking.csv", "ranking.md", "ranking.png"):
    assert (out / name).stat().st_size > 0, name
  with open(out / "ranking.csv") as f:
    rows = list(csv.DictReader(f))
  assert [r["weight"] for r in rows[:2]] == ["mobilenet_v2.tv_in1k"] * 2
  assert [r["weight"] for r in rows[2:]] == [features.RANDOM] * 2  # Controls last by LogME.
  assert [int(r["rank"]) for r in rows] == [1, 2, 3, 4]
  by_name = {r["candidate"]: r for r in rows}
  pretrained = by_name["mobilenet_v2.tv_in1k @ stride_16"]
  control = by_name["mobilenet_v2.random @ stride_16"]
  assert float(pretrained["leep"]) > float(control["leep"])
  assert float(control["leep"]) == pytest.approx(math.log(0.1), abs=0.01)  # ~uniform head.
  assert float(pretrained["knn_acc"]) > 0.9 and float(pretrained["ridge_acc"]) > 0.9
  assert int(pretrained["dim"]) == 96
  assert int(by_name["mobilenet_v2.tv_in1k @ stride_32"]["dim"]) == 1280
  table = (out / "ranking.md").read_text()
  assert "| 1 | mobilenet_v2.tv_in1k" in table and table in proc.stdout
