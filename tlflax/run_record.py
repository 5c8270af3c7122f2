"""What a run resolved for itself, written into `run_info.json` beside `config.json`.

`config.json` holds the config as given, where several fields are None
("choose for me": total_steps, eval and checkpoint cadence, the pretrained
weight as `True`). Reproducing or auditing a run needs the values actually
used, and the process / device layout that split the batches, so they are
recorded here once, at start-up, by process 0.
"""
from __future__ import annotations

from typing import Any, Dict

from tlflax import distributed


def effective(config, pipe, num_steps: int, weight_tag) -> Dict[str, Any]:
  """The config's defaults as this run resolved them (see the module docstring)."""
  eval_every = config.get("eval_every_steps") or pipe.steps_per_epoch
  return {
      "seed": config.seed,
      "total_steps": num_steps,
      "steps_per_epoch": pipe.steps_per_epoch,
      "eval_every_steps": eval_every,
      "checkpoint_every_steps": config.get("checkpoint_every_steps") or eval_every,
      "batch_size": config.batch_size,
      "local_batch_size": pipe.local_batch_size,
      "eval_batch_size": config.eval_batch_size,
      "local_eval_batch_size": pipe.local_eval_batch_size,
      "num_train": pipe.num_train,
      "num_eval": pipe.num_eval,
      "pretrained_weight": weight_tag,  # The weight used for True / a tag; None without one.
      "compute_dtype": config.model.get("dtype", "float32"),
      **distributed.describe(),
  }
