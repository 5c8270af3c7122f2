"""Config -> optax: parameter-group labels from path rules, schedules, optimizers.

`config.optim.rules` is an ordered list of `(regex, value)` pairs over
parameter paths joined with `/` (e.g. `backbone/features_3/dw/conv/kernel`).
As in big_vision, rules use `re.fullmatch`, the first matching rule wins and
every parameter must be covered (end with `(".*", 1.0)` for a catch-all).
`value` is a learning-rate multiplier, or `"frozen"` (also `0`): frozen
parameters go to `optax.set_to_zero()` inside `optax.partition`, so they carry
no optimizer state, and the train step never differentiates them.

Stage-based strategies (`train_last_stages`, `layer_decay`, `unfreeze_every`;
see `tlflax.strategies`) are turned into the same rules. Gradual unfreezing
keeps one compiled train step: a parameter whose first step is s > 0 has
optimizer state from the start, but its group is wrapped in `gated(...)`,
which passes zero updates and holds its state (Adam's moments and count,
the schedule's count) until the global step reaches s.
"""
from __future__ import annotations

import collections
import logging
import re
from typing import Any, Dict, List, NamedTuple, Sequence, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import optax

from tlflax import strategies

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


def group_label(value, start: int = 0) -> str:
  """`frozen`, `lr_x0.1`, or `lr_x0.1_from120` (unfrozen at step 120)."""
  if value == FROZEN:
    return FROZEN
  text = f"{value:g}" if float(f"{value:g}") == value else repr(value)  # Exact multipliers.
  return f"lr_x{text}" + (f"_from{start}" if start else "")


def parse_label(label: str) -> Tuple[float, int]:
  """(lr multiplier, first step) of a non-frozen group label."""
  mult, _, start = label[len("lr_x"):].partition("_from")
  return float(mult), int(start or 0)


def first_steps(paths: Sequence[str], unfreeze: Sequence[Tuple[str, Any]],
                total_steps: int) -> Dict[str, int]:
  """Step at which each parameter starts training: first full match in `unfreeze`, else 0.

  A value < 1 is a fraction of `total_steps`.
  """
  compiled = [(re.compile(r), v) for r, v in unfreeze]
  starts = {}
  for path in paths:
    value = next((v for pattern, v in compiled if pattern.fullmatch(path)), 0)
    if value < 0:
      raise ValueError(f"optim.unfreeze gives {path} the first step {value}; use >= 0.")
    starts[path] = int(round(value * total_steps)) if 0 < value < 1 else int(value)
  return starts


def effective_rules(cfg: ml_collections.ConfigDict, model_name: str = None) -> List[Tuple]:
  """`cfg.rules`, or the rules of a stage strategy (`train_last_stages`, `layer_decay`)."""
  last, decay = cfg.get("train_last_stages"), cfg.get("layer_decay")
  if last is None and decay is None:
    return list(cfg.rules)
  if [tuple(r) for r in cfg.rules] != [(".*", 1.0)]:
    raise ValueError("optim.train_last_stages / optim.layer_decay generate optim.rules; leave "
                     "optim.rules at its default [('.*', 1.0)] or write the rules by hand "
                     "(tlflax.strategies.stage_rules prints a starting point).")
  if model_name is None:
    raise ValueError("Stage strategies need the model name (optim.make(..., model_name=)).")
  return strategies.stage_rules(model_name, train_last=last, layer_decay=decay)


def effective_unfreeze(cfg, model_name: str, total_steps: int) -> List[Tuple[str, Any]]:
  """`cfg.unfreeze`, or the per-stage schedule of `cfg.unfreeze_every`."""
  every = cfg.get("unfreeze_every")
  if every is None:
    return list(cfg.get("unfreeze", ()))
  if cfg.get("unfreeze") or cfg.get("train_last_stages") is not None:
    raise ValueError("optim.unfreeze_every builds the schedule itself: leave optim.unfreeze "
                     "empty and optim.train_last_stages None (use "
                     "optim.unfreeze_start_trainable for stages that train from step 0).")
  return strategies.unfreeze_schedule(model_name, every, total_steps,
                                      cfg.get("unfreeze_start_trainable", 0))


def labels_tree(params, rules, unfreeze=(), total_steps: int = 1) -> Any:
  """The label pytree for `optax.partition` (same structure as `params`).

  Parameters that `unfreeze` starts at or after `total_steps` never train in
  this run, so they are labelled frozen (no optimizer state).
  """
  paths = parameter_paths(params)
  values = assign(paths, rules)
  starts = first_steps(paths, unfreeze, total_steps)
  late = [p for p in paths if starts[p] and values[p] == FROZEN]
  if late:
    raise ValueError(f"optim.unfreeze schedules {late[:3]} (and {len(late)} in all) but "
                     "optim.rules freezes them; give them a learning-rate multiplier.")
  def label(kp, _):
    path = path_of(kp)
    return group_label(FROZEN if starts[path] >= total_steps else values[path], starts[path])
  return jax.tree_util.tree_map_with_path(label, params)


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


def add_l1(coefficient: float, mask) -> optax.GradientTransformation:
  """Adds `coefficient * sign(w)` to the gradient: the subgradient of an L1 penalty."""
  def update(updates, state, params):
    return jax.tree_util.tree_map(lambda g, p: g + coefficient * jnp.sign(p), updates,
                                  params), state
  return optax.masked(optax.GradientTransformation(lambda _: optax.EmptyState(), update), mask)


def penalties(cfg) -> List[optax.GradientTransformation]:
  """L1 / L2 penalties on kernels (decay mask), added to the gradient before any optimizer.

  `l2` is the gradient of `l2/2 * ||w||^2`: for sgd/momentum/adam it is the same
  as `weight_decay`; for adamw it is the coupled penalty beside the decoupled decay.
  """
  out = []
  if cfg.get("l1", 0.0):
    out.append(add_l1(cfg.l1, decay_mask))
  if cfg.get("l2", 0.0):
    out.append(optax.add_decayed_weights(cfg.l2, mask=decay_mask))
  return out


def base_optimizer(cfg, learning_rate) -> optax.GradientTransformation:
  extra = penalties(cfg)
  tx = _optimizer(cfg, learning_rate)
  return optax.chain(*extra, tx) if extra else tx


def _optimizer(cfg, learning_rate) -> optax.GradientTransformation:
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


def labels_for(cfg: ml_collections.ConfigDict, params, total_steps: int,
               model_name: str = None) -> Any:
  """The group labels of `cfg` (rules or stage strategy, plus any unfreeze schedule)."""
  return labels_tree(params, effective_rules(cfg, model_name),
                     effective_unfreeze(cfg, model_name, total_steps), total_steps)


class GatedState(NamedTuple):
  step: jnp.ndarray
  inner: Any


def gated(inner: optax.GradientTransformation, start: int) -> optax.GradientTransformation:
  """`inner` from global step `start` on; before that zero updates and `inner`'s state held.

  Holding the state keeps Adam's bias correction and the schedule's count
  exact from the step the group unfreezes; one compiled step serves the run.
  """
  def init(params):
    return GatedState(jnp.zeros((), jnp.int32), inner.init(params))

  def update(updates, state, params=None):
    active = state.step >= start
    new_updates, new_inner = inner.update(updates, state.inner, params)
    pick = lambda new, old: jnp.where(active, new, old)
    return (jax.tree_util.tree_map(lambda u: jnp.where(active, u, jnp.zeros_like(u)), new_updates),
            GatedState(state.step + 1, jax.tree_util.tree_map(pick, new_inner, state.inner)))
  return optax.GradientTransformation(init, update)


def group_transform(cfg, label: str, schedule) -> optax.GradientTransformation:
  if label == FROZEN:
    return optax.set_to_zero()
  mult, start = parse_label(label)
  tx = base_optimizer(cfg, lambda count: schedule(count + start) * mult)
  return gated(tx, start) if start else tx


def make(cfg: ml_collections.ConfigDict, params, total_steps: int, model_name: str = None):
  """Returns (optax transformation, label tree, base schedule) for `params`.

  `model_name` is needed only by the stage strategies (their rules come from
  the architecture's named stages).
  """
  labels = labels_for(cfg, params, total_steps, model_name)
  schedule = make_schedule(cfg, total_steps)
  transforms = {label: group_transform(cfg, label, schedule)
                for label in set(jax.tree_util.tree_leaves(labels))}
  tx = optax.partition(transforms, labels)
  if cfg.get("grad_clip_norm"):
    tx = optax.chain(optax.clip_by_global_norm(cfg.grad_clip_norm), tx)
  log.info("Parameter groups (optim.rules):\n%s", group_table(params, labels))
  return tx, labels, schedule
