"""Fine-tuning strategies as `optim.rules`, built from each architecture's named stages.

Every zoo family names its stages in input-to-output order (`ModelSpec.stages`,
e.g. MobileNetV2: stem, stage1 ... stage5). Strategies that speak in stages
("train the last 2 stages", "decay the learning rate by 0.7 per stage going
down", "unfreeze one more stage every 50 steps") become ordinary
`(regex, value)` rules here, so they compose with everything that reads rules
(the group table, BatchNorm `follow_params`, the sweep files) and a user can
print them and edit them by hand.

Depth counts from the top: depth 0 is the last stage (nearest the head).
Everything outside `backbone/` (the classifier `head`, `pre_logits`, a
segmentation or detection `neck`/`head`) is new or task-specific and always
trains at the base rate.
"""
from __future__ import annotations

import math
from typing import Any, List, Optional, Sequence, Tuple

Rule = Tuple[str, Any]


def named_stages(model_name: str) -> Sequence[Tuple[str, str]]:
  """(name, regex below `backbone/`) per stage, input to output."""
  from tlflax import models  # pylint: disable=g-import-not-at-top  (heavy import)
  return models.MODELS.get(model_name).stages


def _stage_rule(regex: str, value) -> Rule:
  return (f"backbone/({regex})/.*", value)


def _check_stage_count(model_name: str, n: int, what: str) -> int:
  stages = len(named_stages(model_name))
  if n is None or n < 0 or n > stages:
    raise ValueError(f"{what}={n} but {model_name} has {stages} named stages "
                     f"{[s for s, _ in named_stages(model_name)]}; use 0..{stages}.")
  return stages


def stage_rules(model_name: str, *, train_last: Optional[int] = None,
                layer_decay: Optional[float] = None) -> List[Rule]:
  """Rules for "train only the last N stages" and/or layer-wise learning-rate decay.

  train_last: stages at depth >= N are frozen (0 = linear probe; the number of
    stages = full fine-tuning). None: no stage is frozen.
  layer_decay: the stage at depth d gets multiplier `layer_decay ** (d + 1)`
    (the head keeps 1.0), as in BEiT / timm's LLRD. None: 1.0 everywhere.
  """
  stages = named_stages(model_name)
  if train_last is not None:
    _check_stage_count(model_name, train_last, "train_last_stages")
  if layer_decay is not None and not 0.0 < layer_decay <= 1.0:
    raise ValueError(f"layer_decay={layer_decay} must be in (0, 1]; 0.6-0.9 is usual.")
  rules = []
  for depth, (_, regex) in enumerate(reversed(stages)):
    if train_last is not None and depth >= train_last:
      rules.append(_stage_rule(regex, "frozen"))
    else:
      rules.append(_stage_rule(regex, layer_decay ** (depth + 1) if layer_decay else 1.0))
  return rules + [(".*", 1.0)]


def unfreeze_schedule(model_name: str, every: float, total_steps: int,
                      start_trainable: int = 0) -> List[Tuple[str, int]]:
  """Gradual unfreezing: `(regex, first step)` per stage, top stage first.

  The head and the last `start_trainable` stages train from step 0; then one
  more stage (going down) is unfrozen every `every` steps (a value < 1 is a
  fraction of `total_steps`). Stages whose turn comes at or after
  `total_steps` stay frozen for the whole run (and carry no optimizer state).
  """
  _check_stage_count(model_name, start_trainable, "unfreeze_start_trainable")
  interval = every * total_steps if every < 1 else every
  if interval <= 0:
    raise ValueError(f"unfreeze_every={every} must be > 0 (steps, or a fraction of the run).")
  schedule = []
  for depth, (_, regex) in enumerate(reversed(named_stages(model_name))):
    turn = depth - start_trainable + 1
    start = 0 if turn <= 0 else int(math.ceil(turn * interval))
    schedule.append((f"backbone/({regex})/.*", start))
  return schedule


def describe(rules: Sequence[Rule]) -> str:
  """One line per rule, for logs and sweep tables."""
  return "\n".join(f"  {regex!s:<60} {value}" for regex, value in rules)
