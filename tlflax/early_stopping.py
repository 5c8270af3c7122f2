"""Early stopping on one eval metric with patience, and which eval was the best.

The state is a pure function of the eval history (`metrics.jsonl`), so a
resumed run replays the history up to its checkpoint instead of storing
counters in the checkpoint: the same evals give the same decision.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Dict, Iterable, Optional

MODES = ("max", "min")


@dataclasses.dataclass
class EarlyStopping:
  """Tracks the best value of `metric`; `should_stop` after `patience` evals without improvement.

  An eval improves when it beats the best by more than `min_delta` (in the
  direction of `mode`). `patience=None` never stops but still tracks the best.
  """
  metric: str
  patience: Optional[int] = None
  min_delta: float = 0.0
  mode: str = "max"
  best: Optional[float] = None
  best_step: Optional[int] = None
  bad_evals: int = 0

  def __post_init__(self):
    if self.mode not in MODES:
      raise ValueError(f"early_stopping.mode={self.mode!r}; choose 'max' or 'min'.")
    if self.patience is not None and self.patience < 1:
      raise ValueError(f"early_stopping.patience={self.patience}; use an integer >= 1 "
                       "(evals without improvement before stopping) or None (never stop).")
    if self.min_delta < 0:
      raise ValueError(f"early_stopping.min_delta={self.min_delta} must be >= 0.")

  def improves(self, value: float) -> bool:
    if self.best is None:
      return True
    if self.mode == "max":
      return value > self.best + self.min_delta
    return value < self.best - self.min_delta

  def update(self, step: int, scalars: Dict[str, Any]) -> bool:
    """Records one eval; True when it is the new best."""
    if self.metric not in scalars:
      raise KeyError(f"early_stopping.metric={self.metric!r} is not among the eval metrics "
                     f"{sorted(scalars)}; set --config.early_stopping.metric to one of them.")
    value = float(scalars[self.metric])
    if math.isfinite(value) and self.improves(value):
      self.best, self.best_step, self.bad_evals = value, step, 0
      return True
    self.bad_evals += 1
    return False

  @property
  def should_stop(self) -> bool:
    return self.patience is not None and self.bad_evals >= self.patience

  def replay(self, history: Iterable[Dict[str, Any]]) -> "EarlyStopping":
    for record in history:
      self.update(record["step"], record)
    return self

  def summary(self) -> Dict[str, Any]:
    """`best/<metric>` and `best/step` for summary.json (empty before the first eval)."""
    if self.best_step is None:
      return {}
    return {f"best/{self.metric}": self.best, "best/step": self.best_step}


def from_config(config, main_metric: str) -> EarlyStopping:
  """From `config.early_stopping` (metric None -> the task's main metric)."""
  es = config.get("early_stopping")
  if es is None:
    return EarlyStopping(main_metric)
  mode = es.get("mode") or ("min" if (es.get("metric") or main_metric).endswith("loss") else "max")
  return EarlyStopping(es.get("metric") or main_metric, es.get("patience"),
                       float(es.get("min_delta", 0.0)), mode)


def default_config():
  """`config.early_stopping`: off (patience None) unless an experiment sets patience."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  from ml_collections import config_dict  # pylint: disable=g-import-not-at-top
  c = ml_collections.ConfigDict()
  c.metric = config_dict.placeholder(str)  # An eval metric, e.g. eval/loss; None: the task's main.
  c.patience = config_dict.placeholder(int)  # Evals without improvement before stopping; None: never.
  c.min_delta = 0.0  # An eval improves when it beats the best by more than this.
  c.mode = config_dict.placeholder(str)  # max or min; None: min for *loss metrics, else max.
  c.keep_best = False  # Keep the best eval's state in DIR/checkpoint_best (always with patience).
  return c
