"""`tlflax.experiments` / `python -m tlflax.sweep`: sweeps, results, search, scratch baselines.

Two tests train for real (`python -m tlflax.main` subprocesses on digits, ImageNet
MobileNetV2 as a linear probe at 32 px, 10 steps); the scheduling, pruning, failure and
report logic also runs against `FAKE_MAIN`, a stand-in trainer that starts in a
fraction of a second and writes the same files.
"""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import REPO, mobilenet_v2_weight_file
from tlflax import experiments
from tlflax.config import load_config_file

TINY_SWEEP = '''
from tlflax.config import base_config


def tiny():
  c = base_config()
  c.model.pretrained = True  # Linear probe on ImageNet MobileNetV2: learns in 10 steps.
  c.data.name = "digits"
  c.data.image_size = 32
  c.data.eval_crop = "resize"
  c.batch_size = 16
  c.eval_batch_size = 120
  c.total_steps = 10
  c.eval_every_steps = 5
  c.log_every_steps = 5
  c.optim.name = "adam"
  c.optim.lr = 0.01
  c.optim.rules = [("head/.*", 1.0), ("backbone/.*", "frozen")]
  return c


def get_sweep():
  return dict(base=tiny(), **SWEEP)
'''

# Stands in for `python -m tlflax.main`: same flags, same files, no JAX. eval/accuracy
# peaks at lr=0.01 and grows with the step; `--config.model.pretrained=false` adds
# SCRATCH_BONUS (negative transfer when > 0); lr=0.666 fails.
FAKE_MAIN = '''
import json, math, sys, time
from pathlib import Path
args = dict(a[2:].split("=", 1) for a in sys.argv[1:])
workdir = Path(args["workdir"])
workdir.mkdir(parents=True, exist_ok=True)
over = {k[len("config."):]: v for k, v in args.items() if k.startswith("config.")}
lr, seed = float(over.get("optim.lr", "0.01")), int(over.get("seed", "0"))
scratch = over.get("model.pretrained") == "false"
with open(workdir / "invocations.txt", "a") as f:
  f.write(json.dumps(over) + "\\n")
if lr == 0.666:
  sys.exit("fake_main: lr 0.666 is cursed")
steps, delay = int(over.get("total_steps", "4")), float(over.get("eval_every_steps", "0")) / 10
ckpts = workdir / "checkpoints"
done = max([int(p.name) for p in ckpts.iterdir()] if ckpts.exists() else [0])
def acc(step):
  base = 0.9 - 0.2 * abs(math.log10(lr) + 2) + 0.01 * seed + (SCRATCH_BONUS if scratch else 0)
  return round(base * step / steps, 6)
for step in range(done + 1, steps + 1):
  time.sleep(delay)
  with open(workdir / "metrics.jsonl", "a") as f:
    row = {"step": step, "eval/accuracy": acc(step), "eval/loss": 1 - acc(step)}
    f.write(json.dumps(row) + "\\n")
  (ckpts / str(step)).mkdir(parents=True, exist_ok=True)
(workdir / "summary.json").write_text(json.dumps({
    "eval/accuracy": acc(steps), "eval/loss": 1 - acc(steps), "step": steps,
    "best/eval/accuracy": acc(steps), "best/step": steps}))
'''


def write_sweep(tmp_path, name, sweep):
  path = tmp_path / f"{name}.py"
  path.write_text(TINY_SWEEP + f"\nSWEEP = {sweep!r}\n")
  return experiments.load_sweep(path)


@pytest.fixture
def fake_main(tmp_path):
  def make(scratch_bonus=0.0):
    path = tmp_path / "fake_main.py"
    path.write_text(FAKE_MAIN.replace("SCRATCH_BONUS", repr(scratch_bonus)))
    return [sys.executable, str(path)]
  return make


def invocations(workdir: Path):
  path = workdir / "invocations.txt"
  return path.read_text().splitlines() if path.exists() else []


def read_csv(path):
  with open(path) as f:
    return list(csv.DictReader(f))


def test_unknown_or_unsettable_fields_fail_before_anything_runs(tmp_path):
  root = tmp_path / "root"
  sweep = write_sweep(tmp_path, "typo", {"grid": {"optim.lrr": [0.1, 0.2]}})
  with pytest.raises(ValueError, match=r"Unknown config field 'optim.lrr'.*Did you mean: optim.lr"):
    experiments.run_sweep(sweep, root)
  sweep = write_sweep(tmp_path, "typo2", {"runs": [{"optim.lr": 0.1}, {"model.dropot": 0.2}]})
  with pytest.raises(ValueError, match="model.dropot"):
    experiments.run_sweep(sweep, root)
  sweep = write_sweep(tmp_path, "rules", {"grid": {"optim.rules": [[(".*", 1.0)]]}})
  with pytest.raises(ValueError, match=r"optim.rules is a list field.*vary 'config'"):
    experiments.run_sweep(sweep, root)
  sweep = write_sweep(tmp_path, "type", {"grid": {"optim.lr": ["fast"]}})
  with pytest.raises(ValueError, match="cannot set optim.lr='fast'"):
    experiments.run_sweep(sweep, root)
  sweep = write_sweep(tmp_path, "space", {"search": {"space": {"optim.lrr": ("uniform", 0, 1)},
                                                     "num_trials": 2, "method": "random"}})
  with pytest.raises(ValueError, match="optim.lrr"):
    experiments.run_sweep(sweep, root)
  assert not root.exists()  # Nothing was written, nothing ran.


def test_plan_names_grid_list_product_and_scratch_partners(tmp_path):
  sweep = write_sweep(tmp_path, "plan", {
      "runs": [{"name": "linear"}, {"name": "big", "optim.lr": 0.1, "data.crop_scale": (0.5, 1)}],
      "grid": {"label_smoothing": [0.0, 0.1], "seed": [0, 1]},
      "overrides": {"optim.warmup_steps": 3}, "add_scratch_baseline": True})
  runs = experiments.plan(sweep, tmp_path / "root")
  names = [r.name for r in runs]
  assert len(runs) == 2 * 2 * 2 * 2
  assert names[:4] == ["linear_label_smoothing=0_seed=0", "linear_label_smoothing=0_seed=1",
                       "linear_label_smoothing=0.1_seed=0", "linear_label_smoothing=0.1_seed=1"]
  by_name = {r.name: r for r in runs}
  big = by_name["big_label_smoothing=0.1_seed=1"]
  assert big.variant == "big_label_smoothing=0.1" and big.seed == 1
  assert big.cli == {"optim.warmup_steps": "3", "optim.lr": "0.1", "data.crop_scale": "(0.5, 1)",
                     "label_smoothing": "0.1", "seed": "1"}
  assert big.baseline == "big_scratch_label_smoothing=0.1_seed=1"
  partner = by_name[big.baseline]
  assert partner.scratch and partner.cli["model.pretrained"] == "false"
  assert {k: v for k, v in partner.cli.items() if k != "model.pretrained"} == big.cli
  assert partner.workdir == tmp_path / "root" / "plan" / partner.name
  # A shared scratch variant: every variant is compared with it, per grid value and seed.
  sweep = write_sweep(tmp_path, "shared", {
      "runs": [{"name": "a"}, {"name": "b", "optim.lr": 0.1}], "grid": {"seed": [0, 1]},
      "add_scratch_baseline": {"optim.lr": 0.05}})
  runs = experiments.plan(sweep, tmp_path / "root")
  assert [r.name for r in runs] == ["a_seed=0", "a_seed=1", "b_seed=0", "b_seed=1",
                                    "scratch_seed=0", "scratch_seed=1"]
  assert [r.baseline for r in runs] == ["scratch_seed=0", "scratch_seed=1"] * 2 + [None, None]


def test_real_sweep_runs_skips_resumes_and_reports_transfer_gain(tmp_path):
  """2 runs of `tlflax.main` (pretrained linear probe + its scratch baseline), for real."""
  mobilenet_v2_weight_file()
  sweep = write_sweep(tmp_path, "tiny", {"grid": {"optim.lr": [0.03]},
                                         "add_scratch_baseline": True})
  root = tmp_path / "root"
  first = experiments.run_sweep(sweep, root)
  assert first["runs"] == {"lr=0.03": "done", "scratch_lr=0.03": "done"}
  sweep_root = root / "tiny"
  rows = read_csv(sweep_root / "results.csv")
  assert [r["run"] for r in rows] == ["lr=0.03", "scratch_lr=0.03"]
  for column in ("optim.lr", "scratch", "status", "eval/accuracy", "best/eval/accuracy",
                 "best/step", "eval/loss", "eval/top5", "transfer_gain", "negative_transfer",
                 "wall_s", "workdir"):
    assert column in rows[0], column
  summaries = [json.loads((sweep_root / r["run"] / "summary.json").read_text()) for r in rows]
  assert [float(r["eval/accuracy"]) for r in rows] == [s["eval/accuracy"] for s in summaries]
  gain = summaries[0]["eval/accuracy"] - summaries[1]["eval/accuracy"]
  assert float(rows[0]["transfer_gain"]) == pytest.approx(gain, abs=1e-12)
  assert gain > 0.03 and rows[0]["negative_transfer"] == "False"  # ImageNet features help.
  assert rows[1]["transfer_gain"] == "" and rows[1]["scratch"] == "True"
  assert all(r["status"] == "done" and float(r["wall_s"]) > 0 for r in rows)
  md = (sweep_root / "results.md").read_text()
  assert "| lr=0.03 | 0.0300 | no | done |" in md and "transfer_gain" in md
  assert (sweep_root / "metric_by_variant.png").stat().st_size > 0
  assert (sweep_root / "curves.png").stat().st_size > 0
  logs = {r["run"]: (sweep_root / r["run"] / "log.txt").read_text() for r in rows}
  assert all("start at 0" in text for text in logs.values())

  # Second invocation: everything is done, nothing runs.
  second = experiments.run_sweep(sweep, root)
  assert second["runs"] == {"lr=0.03": "skipped", "scratch_lr=0.03": "skipped"}
  assert {r: (sweep_root / r / "log.txt").read_text() for r in logs} == logs

  # Interrupt one run after step 5: it resumes from its checkpoint, the other is left alone.
  scratch = sweep_root / "scratch_lr=0.03"
  (scratch / "summary.json").unlink()
  import shutil
  shutil.rmtree(scratch / "checkpoints" / "10")
  third = experiments.run_sweep(sweep, root)
  assert third["runs"] == {"lr=0.03": "skipped", "scratch_lr=0.03": "done"}
  resumed_log = (scratch / "log.txt").read_text().split("===== ")[-1]
  assert "start at 5" in resumed_log
  assert (sweep_root / "lr=0.03" / "log.txt").read_text() == logs["lr=0.03"]
  assert json.loads((scratch / "summary.json").read_text()) == summaries[1]  # Bit-exact resume.
  record = json.loads((scratch / "sweep_run.json").read_text())
  assert [a["status"] for a in record["attempts"]] == ["done", "done"]


def test_parallel_sweep_keeps_going_when_a_run_fails(tmp_path, fake_main):
  sweep = write_sweep(tmp_path, "par", {"grid": {"optim.lr": [0.01, 0.666, 0.1, 0.001]},
                                        "overrides": {"total_steps": 3}})
  root = tmp_path / "root"
  result = experiments.run_sweep(sweep, root, parallel=2, launcher=fake_main())
  assert result["runs"] == {"lr=0.01": "done", "lr=0.666": "failed", "lr=0.1": "done",
                            "lr=0.001": "done"}
  rows = {r["run"]: r for r in read_csv(root / "par" / "results.csv")}
  assert rows["lr=0.666"]["status"] == "failed" and rows["lr=0.666"]["eval/accuracy"] == ""
  assert float(rows["lr=0.01"]["eval/accuracy"]) == 0.9
  assert "cursed" in (root / "par" / "lr=0.666" / "log.txt").read_text()
  assert "Not finished: `lr=0.666` (failed" in (root / "par" / "results.md").read_text()
  # Again: only the failed run is retried; --only restricts further.
  again = experiments.run_sweep(sweep, root, launcher=fake_main())
  assert again["runs"] == {"lr=0.01": "skipped", "lr=0.666": "failed", "lr=0.1": "skipped",
                           "lr=0.001": "skipped"}
  assert len(invocations(root / "par" / "lr=0.666")) == 2
  assert len(invocations(root / "par" / "lr=0.01")) == 1
  only = experiments.run_sweep(sweep, root, only=["lr=0.1", "lr=0.00*"], launcher=fake_main())
  assert only["runs"] == {"lr=0.1": "skipped", "lr=0.001": "skipped"}
  with pytest.raises(ValueError, match="matches no run"):
    experiments.run_sweep(sweep, root, only=["lr=7"], launcher=fake_main())
  # Changing a run's request (here total_steps) runs it again in the same workdir.
  sweep.overrides["total_steps"] = 4
  changed = experiments.run_sweep(sweep, root, only=["lr=0.01"], launcher=fake_main())
  assert changed["runs"] == {"lr=0.01": "done"}
  assert [json.loads(l)["total_steps"] for l in invocations(root / "par" / "lr=0.01")] == ["3", "4"]


def test_seed_aggregate_and_negative_transfer_flag(tmp_path, fake_main):
  sweep = write_sweep(tmp_path, "seeds", {
      "runs": [{"name": "good", "optim.lr": 0.01}, {"name": "bad", "optim.lr": 0.0001}],
      "grid": {"seed": [0, 1, 2]}, "add_scratch_baseline": {"optim.lr": 0.01},
      "overrides": {"total_steps": 2}})
  root = tmp_path / "root"
  experiments.run_sweep(sweep, root, launcher=fake_main(scratch_bonus=-0.5))
  rows = {r["run"]: r for r in read_csv(root / "seeds" / "results.csv")}
  # fake: acc = 0.9 - 0.2 |log10(lr) + 2| + 0.01 seed (- 0.5 for scratch).
  assert float(rows["good_seed=1"]["eval/accuracy"]) == pytest.approx(0.91)
  assert float(rows["bad_seed=2"]["transfer_gain"]) == pytest.approx(0.5 - 0.4)
  agg = {r["variant"]: r for r in read_csv(root / "seeds" / "results_by_variant.csv")}
  assert set(agg) == {"good", "bad", "scratch"}
  assert float(agg["good"]["eval/accuracy mean"]) == pytest.approx(0.91)
  assert float(agg["good"]["eval/accuracy std"]) == pytest.approx(0.01)  # Sample std, n-1.
  assert float(agg["good"]["transfer_gain mean"]) == pytest.approx(0.5)
  assert agg["good"]["negative_transfer"] == "no" and agg["good"]["seeds"] == "0,1,2"
  md = (root / "seeds" / "results.md").read_text()
  assert "| good | 3/3 | 0.9100 ± 0.0100 |" in md
  # Scratch now better than the "bad" variant: negative transfer flagged.
  experiments.run_sweep(write_sweep(tmp_path, "seeds2", {
      "runs": [{"name": "good", "optim.lr": 0.01}, {"name": "bad", "optim.lr": 0.0001}],
      "grid": {"seed": [0, 1, 2]}, "add_scratch_baseline": {"optim.lr": 0.01},
      "overrides": {"total_steps": 2}}), root, launcher=fake_main(scratch_bonus=-0.2))
  agg = {r["variant"]: r for r in read_csv(root / "seeds2" / "results_by_variant.csv")}
  assert float(agg["bad"]["transfer_gain mean"]) == pytest.approx(-0.2)
  assert agg["bad"]["negative_transfer"] == "yes" and agg["good"]["negative_transfer"] == "no"
  rows = {r["run"]: r for r in read_csv(root / "seeds2" / "results.csv")}
  assert rows["bad_seed=0"]["negative_transfer"] == "True"
  md = (root / "seeds2" / "results.md").read_text()
  assert "| bad | 3/3 | 0.5100 ± 0.0100 | 0.5100 ± 0.0100 | -0.2000 ± 0.0000 | yes |" in md
  # --report_only rebuilds the same tables from the workdirs.
  before = (root / "seeds2" / "results.csv").read_text()
  (root / "seeds2" / "results.csv").unlink()
  (root / "seeds2" / "metric_by_variant.png").unlink()
  experiments.report_only(experiments.load_sweep(tmp_path / "seeds2.py"), root)
  assert (root / "seeds2" / "results.csv").read_text() == before
  assert (root / "seeds2" / "metric_by_variant.png").exists()


def test_tpe_search_prunes_on_intermediate_evals_and_writes_best_config(tmp_path, fake_main):
  sweep = write_sweep(tmp_path, "tpe", {
      "overrides": {"total_steps": 6, "eval_every_steps": 2},  # fake: 0.2 s per eval.
      "search": {"space": {"optim.lr": ("log_uniform", 1e-5, 1.0),
                           "label_smoothing": ("choice", [0.0, 0.1])},
                 "method": "tpe", "num_trials": 8, "seed": 0, "pruner": "median",
                 "start": [{"optim.lr": 0.5, "label_smoothing": 0.0}]}})
  root = tmp_path / "root"
  result = experiments.run_sweep(sweep, root, launcher=fake_main())
  study = result["study"]
  states = [t.state.name for t in study.trials]
  assert len(states) == 8 and "PRUNED" in states
  assert study.trials[0].params["optim.lr"] == 0.5
  for t in study.trials:
    lines = experiments.read_jsonl(root / "tpe" / f"trial_{t.number:04d}" / "metrics.jsonl")
    if t.state.name == "PRUNED":  # Stopped early: not all 6 evals were written.
      assert len(lines) < 6
      assert t.intermediate_values
  best = study.best_trial
  assert best.value == max(t.value for t in study.trials if t.state.name == "COMPLETE")
  config = load_config_file(str(root / "tpe" / "best_config.py"))
  assert config.optim.lr == best.params["optim.lr"]
  assert config.label_smoothing == best.params["label_smoothing"]
  assert config.total_steps == 6 and config.data.train_split == "train"  # No holdout fields.
  md = (root / "tpe" / "results.md").read_text()
  # digits: trials were selected on a holdout carved from train (data.holdout_fraction).
  assert "WARNING: trials were selected on the VAL split" not in md
  assert config.data.holdout_fraction == 0.0  # The best config trains on all of train.
  assert "trial_0007" in md and (root / "tpe" / "search.png").exists()
  # Resuming a finished search runs nothing.
  again = experiments.run_sweep(experiments.load_sweep(tmp_path / "tpe.py"), root,
                                launcher=fake_main())
  assert again["runs"] == {} and len(again["study"].trials) == 8


@pytest.mark.filterwarnings("ignore:Fixed parameter optim.lr")  # The bad start is off-range.
def test_real_search_finds_a_better_lr_than_a_bad_start(tmp_path):
  mobilenet_v2_weight_file()
  sweep = write_sweep(tmp_path, "lr", {"search": {
      "space": {"optim.lr": ("log_uniform", 3e-3, 0.1)}, "method": "random", "num_trials": 3,
      "seed": 0, "start": [{"optim.lr": 1e-6}], "pruner": None}})
  result = experiments.run_sweep(sweep, tmp_path / "root")
  trials = result["study"].trials
  assert [t.state.name for t in trials] == ["COMPLETE"] * 3
  assert trials[0].params["optim.lr"] == 1e-6
  best = result["study"].best_trial
  assert best.params["optim.lr"] != 1e-6 and best.value > trials[0].value + 0.03
  config = load_config_file(str(tmp_path / "root" / "lr" / "best_config.py"))
  assert config.optim.lr == best.params["optim.lr"]
  rows = read_csv(tmp_path / "root" / "lr" / "results.csv")
  assert [r["run"] for r in rows] == ["trial_0000", "trial_0001", "trial_0002"]
  assert float(rows[best.number]["eval/accuracy"]) == best.value


def test_holdout_is_carved_from_train_for_folder_datasets(tmp_path):
  from tlflax import data
  from tlflax.config import base_config
  root = tmp_path / "ds"
  for split, n in (("train", {"ants": 10, "bees": 5}), ("val", {"ants": 2, "bees": 2})):
    for name, count in n.items():
      (root / split / name).mkdir(parents=True)
      for i in range(count):
        Image.fromarray(np.full((8, 8, 3), i, np.uint8)).save(root / split / name / f"{i}.png")
  (root / "train" / "ants" / "readme.txt").write_text("not an image")
  config = base_config()
  config.data.name, config.data.root = "folder", str(root)
  overrides, note = experiments.holdout_overrides(config, 0.2, 0, tmp_path / "sweep")
  assert overrides == {"data.root": str(tmp_path / "sweep" / "holdout_data"),
                       "data.train_split": "fit", "data.eval_split": "holdout"}
  carved = tmp_path / "sweep" / "holdout_data"
  files = {s: {c: sorted(p.name for p in (carved / s / c).iterdir()) for c in ("ants", "bees")}
           for s in ("fit", "holdout")}
  assert [len(files["holdout"][c]) for c in ("ants", "bees")] == [2, 1]  # Stratified.
  for c, n in (("ants", 10), ("bees", 5)):
    assert sorted(files["fit"][c] + files["holdout"][c], key=lambda f: int(f[:-4])) == [
        f"{i}.png" for i in range(n)]
    assert not set(files["fit"][c]) & set(files["holdout"][c])
  assert "12 fit / 3 holdout" in note
  experiments.apply_overrides(config, overrides)
  source = data.DATASETS.get("folder")(config.data)  # The data layer reads it unchanged.
  assert (source.num_train, source.num_eval, source.class_names) == (12, 3, ["ants", "bees"])
  # TFDS datasets: split slices; other datasets (digits): data.holdout_fraction.
  config = base_config()
  config.data.name = "cifar10"
  assert experiments.holdout_overrides(config, 0.1, 0, tmp_path / "x")[0] == {
      "data.train_split": "train[:90%]", "data.eval_split": "train[90%:]"}
  config.data.name = "digits"
  assert experiments.holdout_overrides(config, 0.1, 0, tmp_path / "x")[0] == {
      "data.holdout_fraction": 0.1, "data.holdout_seed": 0}


def test_cli_dry_run_on_the_shipped_hymenoptera_sweep(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  result = subprocess.run(
      [sys.executable, "-m", "tlflax.sweep", "experiments/hymenoptera_strategies.py",
       "--workdir", str(tmp_path), "--dry_run"], cwd=REPO, env=env, capture_output=True,
      text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  commands = [l for l in result.stdout.splitlines() if "-m tlflax.main" in l]
  assert len(commands) == 15  # 5 strategies (scratch included) x 3 seeds.
  assert any("--config=configs/hymenoptera.py:gradual" in c for c in commands)
  assert any("--config=configs/hymenoptera.py:full" in c and "--config.model.pretrained=false"
             in c and "--config.seed=2" in c for c in commands)
  assert "hymenoptera_strategies/linear_seed=0" in result.stdout
  assert not (tmp_path / "hymenoptera_strategies").exists()  # A dry run writes nothing.
