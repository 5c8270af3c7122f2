"""Early stopping: the decision on scripted metric sequences, and a run that stops and keeps
its best checkpoint."""
import json

import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest

from tests.test_train import saved_params
from tests.tiny import tiny_digits_config
from tlflax import early_stopping, train
from tlflax.pretrained.load import flatten


def stops_at(values, **kwargs):
  """The eval index (1-based) at which the tracker says stop, or None."""
  tracker = early_stopping.EarlyStopping("eval/accuracy", **kwargs)
  for i, value in enumerate(values, 1):
    tracker.update(10 * i, {"eval/accuracy": value})
    if tracker.should_stop:
      return i, tracker
  return None, tracker


def test_patience_counts_evals_without_strict_improvement():
  at, tracker = stops_at([0.5, 0.6, 0.6, 0.55, 0.9], patience=2)
  assert at == 4  # 0.6 again is no improvement; 0.55 is the second miss.
  assert (tracker.best, tracker.best_step) == (0.6, 20)
  at, _ = stops_at([0.5, 0.6, 0.55, 0.7, 0.65, 0.8], patience=2)
  assert at is None  # Each miss is followed by a new best: the counter resets.


def test_min_delta_mode_and_off():
  at, tracker = stops_at([0.50, 0.505, 0.509, 0.52], patience=2, min_delta=0.01)
  assert at == 3 and tracker.best_step == 10  # +0.005 and +0.009 are below min_delta.
  tracker = early_stopping.EarlyStopping("eval/loss", patience=1, mode="min")
  for step, loss in [(1, 2.0), (2, 1.5), (3, 1.7)]:
    tracker.update(step, {"eval/loss": loss})
  assert tracker.should_stop and tracker.summary() == {"best/eval/loss": 1.5, "best/step": 2}
  at, tracker = stops_at([0.9, 0.1, 0.1, 0.1], patience=None)
  assert at is None and tracker.summary() == {"best/eval/accuracy": 0.9, "best/step": 10}
  at, _ = stops_at([0.5, float("nan"), 0.4], patience=2)
  assert at == 3  # NaN never counts as a best.


def test_config_defaults_and_errors():
  c = ml_collections.ConfigDict({"early_stopping": early_stopping.default_config()})
  tracker = early_stopping.from_config(c, "eval/mIoU")
  assert (tracker.metric, tracker.mode, tracker.patience) == ("eval/mIoU", "max", None)
  c.early_stopping.metric = "eval/loss"
  assert early_stopping.from_config(c, "eval/mIoU").mode == "min"
  with pytest.raises(ValueError, match="patience"):
    early_stopping.EarlyStopping("m", patience=0)
  with pytest.raises(KeyError, match="eval/accuracy"):
    early_stopping.EarlyStopping("eval/acc").update(1, {"eval/accuracy": 1.0})


SCRIPT = {2: 0.30, 4: 0.50, 6: 0.45, 8: 0.50, 10: 0.90, 12: 0.95}


def scripted_evaluate(evaluate):
  """The real eval with eval/accuracy replaced by SCRIPT[step]: a known curve."""
  def wrapped(task, eval_step, state, pipe, batch_sharding):
    result = evaluate(task, eval_step, state, pipe, batch_sharding)
    result["scalars"]["eval/accuracy"] = SCRIPT[int(state.step)]
    return result
  return wrapped


def test_run_stops_at_the_right_eval_and_keeps_the_best_checkpoint(tmp_path, monkeypatch):
  monkeypatch.setattr(train, "evaluate", scripted_evaluate(train.evaluate))
  config = tiny_digits_config(total_steps=12)
  config.early_stopping.patience = 2
  config.keep_checkpoints = 10
  summary = train.run(config, str(tmp_path))
  history = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [h["step"] for h in history] == [2, 4, 6, 8]  # 6 and 8 do not beat 0.50 at step 4.
  assert summary["step"] == 8 and summary["stopped_early"] is True
  assert summary["eval/accuracy"] == 0.50  # Flat keys: the final eval (step 8).
  assert (summary["best/eval/accuracy"], summary["best/step"]) == (0.50, 4)
  assert json.loads((tmp_path / "summary.json").read_text()) == summary
  assert [p.name for p in (tmp_path / "checkpoint_best").iterdir() if p.name.isdigit()] == ["4"]
  with ocp.StandardCheckpointer() as ckptr:
    best = ckptr.restore(tmp_path / "checkpoint_best" / "4" / "default")
  best = flatten({"params": best["params"], "model_state": best["model_state"]})
  at_4, at_8 = saved_params(tmp_path, 4), saved_params(tmp_path, 8)
  assert all(np.array_equal(best[k], at_4[k]) for k in at_4)  # The best step's parameters,
  assert not all(np.array_equal(at_4[k], at_8[k]) for k in at_4)  # not the last ones.
  # The same command again: the run is over, nothing is trained or logged again.
  assert train.run(config, str(tmp_path)) == summary
  assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 4
