"""Config -> optax: parameter-group labels from path rules, schedules, optimizers.

`config.optim.rules` is an ordered list of `(regex, value)` pairs over
parameter paths joined with `/` (e.g. `backbone/features_3/dw/conv/kernel`).
As in big_vision, rules use `re.fullmatch`, the first matching rule wins and
every parameter must be covered (end with `(".*", 1.0)` for a catch-all).
`value` is a learning-rate multiplier, or `"frozen"` (also `0`): frozen
parameters go to `optax.set_to_zero()` inside `optax.partition`, so they carry
no optimizer state, and the train step never differentiates them.
"""
from __future__ import annotations

import collections
import logging
import re
from typing import Any, Dict, List, Sequence, Tuple

import jax
import ml_collections
import optax

log = logging.getLogger(__name__)
FROZEN = "frozen"


def path_of(key_path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in key_path)


def parameter_paths(params) -> List[str]:
  return [path_of(kp) for kp, _ in jax.tree_util.tree_flatten_with_path(params)[0]]


def _rule_value(value) -> Any:
  if isinstance(value, str):
    if value != FROZEN:
      raise ValueError(f"Rule value {value!r} is neither a number nor {FROZEN!r}.")
    return FROZEN
  value = float(value)
  if value < 0:
    raise ValueError(f"Learning-rate multiplier {value} is negative.")
  return FROZEN if value == 0 else value


def assign(paths: Sequence[str], rules: Sequence[Tuple[str, Any]]) -> Dict[str, Any]:
  """Maps every path to the value of its first fully matching rule."""
  compiled = [(re.compile(r), _rule_value(v)) for r, v in rules]
  result, uncovered = {}, []
  for path in paths:
    for pattern, value in compiled:
      if pattern.fullmatch(path):
        result[path] = value
        break
    else:
      uncovered.append(path)
  if uncovered:
    raise ValueError(
        f"{len(uncovered)} parameters match no rule in optim.rules, e.g. {uncovered[:5]}. "
        "Add a rule for them (a final ('.*', 1.0) covers everything else).")
  return result


def group_label(value) -> str:
  return FROZEN if value == FROZEN else f"lr_x{value:g}"


def labels_tree(params, rules) -> Any:
  """The label pytree for `optax.partition` (same structure as `params`)."""
  values = assign(parameter_paths(params), rules)
  return jax.tree_util.tree_map_with_path(lambda kp, _: group_label(values[path_of(kp)]), params)


def trainable_mask(labels) -> Any:
  return jax.tree_util.tree_map(lambda label: label != FROZEN, labels)


def group_table(params, labels) -> str:
  """A small table: group, #tensors, #parameters; logged at start so users see the assignment."""
  counts = collections.defaultdict(lambda: [0, 0])
  for p, label in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(labels)):
    counts[label][0] += 1
    counts[label][1] += int(p.size)
  rows = [f"{'group':<14}{'tensors':>9}{'params':>12}"]
  rows += [f"{label:<14}{n:>9}{size:>12,}" for label, (n, size) in sorted(counts.items())]
  return "\n".join(rows)


def make_schedule(cfg: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  """Base learning rate over steps: linear warmup, then constant / cosine / step decay."""
  warmup = int(cfg.get("warmup_steps", 0))
  decay_steps = max(1, total_steps - warmup)
  name = cfg.get("schedule", "cosine")
  if name == "cosine":
    main = optax.cosine_decay_schedule(cfg.lr, decay_steps, alpha=cfg.get("final_lr_fraction", 0.0))
  elif name == "step":
    boundaries = {int(b * decay_steps) if b < 1 else int(b): cfg.get("decay_factor", 0.1)
                  for b in cfg.get("step_boundaries", (0.5, 0.75))}
    main = optax.piecewise_constant_schedule(cfg.lr, boundaries)
  elif name == "constant":
    main = optax.constant_schedule(cfg.lr)
  else:
    raise ValueError(f"optim.schedule={name!r}; choose one of cosine, step, constant.")
  if not warmup:
    return main
  return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, warmup), main], [warmup])


def decay_mask(params) -> Any:
  """Weight decay on kernels only: no decay on norms and biases (1-D tensors)."""
  return jax.tree_util.tree_map(lambda p: p.ndim > 1, params)


def base_optimizer(cfg, learning_rate) -> optax.GradientTransformation:
  name = cfg.name
  wd = cfg.get("weight_decay", 0.0)
  if name in ("sgd", "momentum", "nesterov"):
    momentum = None if name == "sgd" else cfg.get("momentum", 0.9)
    tx = optax.sgd(learning_rate, momentum=momentum, nesterov=name == "nesterov")
  elif name == "rmsprop":
    tx = optax.rmsprop(learning_rate, decay=cfg.get("rms_decay", 0.9), eps=cfg.get("eps", 1e-8),
                       momentum=cfg.get("momentum", 0.0) or None)
  elif name == "adam":
    tx = optax.adam(learning_rate, b1=cfg.get("b1", 0.9), b2=cfg.get("b2", 0.999),
                    eps=cfg.get("eps", 1e-8))
  elif name == "adamw":
    return optax.adamw(learning_rate, b1=cfg.get("b1", 0.9), b2=cfg.get("b2", 0.999),
                       eps=cfg.get("eps", 1e-8), weight_decay=wd, mask=decay_mask)
  else:
    raise ValueError(f"optim.name={name!r}; choose one of sgd, momentum, nesterov, rmsprop, "
                     "adam, adamw.")
  if wd:  # Coupled L2 as in torch.optim.SGD(weight_decay=...), masked like AdamW.
    tx = optax.chain(optax.add_decayed_weights(wd, mask=decay_mask), tx)
  return tx


def make(cfg: ml_collections.ConfigDict, params, total_steps: int):
  """Returns (optax transformation, label tree, base schedule) for `params`."""
  labels = labels_tree(params, cfg.rules)
  schedule = make_schedule(cfg, total_steps)
  transforms = {}
  for label in set(jax.tree_util.tree_leaves(labels)):
    if label == FROZEN:
      transforms[label] = optax.set_to_zero()
    else:
      mult = float(label[len("lr_x"):])
      transforms[label] = base_optimizer(cfg, lambda step, m=mult: schedule(step) * m)
  tx = optax.partition(transforms, labels)
  if cfg.get("grad_clip_norm"):
    tx = optax.chain(optax.clip_by_global_norm(cfg.grad_clip_norm), tx)
  log.info("Parameter groups (optim.rules):\n%s", group_table(params, labels))
  return tx, labels, schedule
