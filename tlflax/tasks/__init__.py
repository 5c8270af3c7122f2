"""Tasks: what a model's outputs mean, how they are scored, and what a run reports.

A `Task` bundles the functions the train and eval steps need, so `steps.py`
and `train.py` never branch on the kind of problem. Each task module
registers a factory `make(config) -> Task` under its name (`config.task`).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, List, Mapping, Optional

import ml_collections

from tlflax.registry import Registry

Outputs = Any  # Logits array, or a dict of arrays (segmentation: "out", "aux").
Batch = Mapping[str, Any]


@dataclasses.dataclass(frozen=True)
class Task:
  """The task-specific pieces of training and evaluation.

  loss(outputs, batch) -> scalar mean loss (jit-traced).
  train_sums(outputs, batch) -> dict of on-device sums; "count" = images.
  train_scalars(host_sums) -> {"train/...": float} for the log (loss excluded).
  eval_sums(outputs, batch) -> dict of sums over real rows (batch["mask"] = 1), or
    per-image results when `eval_accumulate` is set.
  eval_metrics(accumulated, class_names) -> {"scalars": {"eval/...": ...}, ...report}.
  main_metric: the eval scalar that picks the best step (higher is better).
  eval_accumulate(acc or None, eval_sums output, batch) -> acc, on the host: for
    metrics that are not sums (detection AP needs every box); None adds on device.
  """
  name: str
  loss: Callable[[Outputs, Batch], Any]
  train_sums: Callable[[Outputs, Batch], Dict[str, Any]]
  train_scalars: Callable[[Mapping[str, Any]], Dict[str, float]]
  eval_sums: Callable[[Outputs, Batch], Dict[str, Any]]
  eval_metrics: Callable[[Mapping[str, Any], List[str]], Dict[str, Any]]
  main_metric: str
  eval_accumulate: Optional[Callable[[Any, Any, Batch], Any]] = None


TASKS = Registry("task")


def make(config: ml_collections.ConfigDict, **context) -> Task:
  """The task of an experiment config (`config.task`, default classification).

  `context` carries what some tasks need beyond the config (detection: the
  module, for its anchors, and the pipeline, for the eval ground truth).
  """
  # Importing registers the tasks; deferred so `tlflax.tasks` stays import-light.
  from tlflax.tasks import classification, detection, segmentation  # noqa: F401
  return TASKS.get(config.get("task", "classification"))(config, **context)
