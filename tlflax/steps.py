"""The train state and the jit-compiled train / eval steps.

Frozen parameters (label `frozen` from `optim.rules`) are never differentiated:
the loss is a function of the trainable parameters only, so XLA does not
compute their gradients at all, and they are copied through unchanged (bit-
identical; `p + 0` would turn -0.0 into 0.0).
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Mapping, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from tlflax import mixup as mixup_lib
from tlflax.optim import FROZEN
from tlflax.tasks import Task
from tlflax.tasks import classification


@flax.struct.dataclass
class TrainState:
  step: jnp.ndarray
  params: Any
  model_state: Any  # Non-trainable collections, e.g. {"batch_stats": ...}.
  opt_state: Any


def create_state(variables: Dict, tx: optax.GradientTransformation) -> TrainState:
  params = variables["params"]
  model_state = {k: v for k, v in variables.items() if k != "params"}
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, model_state=model_state,
                    opt_state=tx.init(params))


def _split(params, labels):
  flat = flax.traverse_util.flatten_dict(params)
  flat_labels = flax.traverse_util.flatten_dict(labels)
  trainable = {k: v for k, v in flat.items() if flat_labels[k] != FROZEN}
  frozen = {k: v for k, v in flat.items() if flat_labels[k] == FROZEN}
  return trainable, frozen


def make_train_step(module: nn.Module, tx: optax.GradientTransformation, labels: Any,
                    label_smoothing: float = 0.0, seed: int = 0,
                    task: Optional[Task] = None, mixup: Optional[Mapping] = None) -> Callable:
  """(state, batch) -> (state, metric sums); `labels` is the static group-label tree.

  `task` supplies the loss and metric sums (default: classification with
  `label_smoothing`). `mixup` (`tlflax.mixup.default_config()` fields) mixes
  each batch on device before the forward pass.
  """
  task = task or classification.make_task(label_smoothing)
  base_rng = jax.random.key(seed)
  mixing = dict(mixup) if mixup_lib.enabled(mixup) else None

  def train_step(state: TrainState, batch):
    trainable, frozen = _split(state.params, labels)
    rng = jax.random.fold_in(base_rng, state.step)  # Dropout: same on resume.
    if mixing:
      batch = mixup_lib.mix_batch(batch, jax.random.fold_in(rng, 1), mixing)

    def loss_of(trainable_flat):
      params = flax.traverse_util.unflatten_dict({**frozen, **trainable_flat})
      outputs, new_model_state = module.apply(
          {"params": params, **state.model_state}, batch["image"], train=True,
          rngs={"dropout": rng}, mutable=list(state.model_state))
      return task.loss(outputs, batch), (outputs, new_model_state)

    (loss, (outputs, new_model_state)), grads = jax.value_and_grad(loss_of, has_aux=True)(trainable)
    full_grads = flax.traverse_util.unflatten_dict(
        {**{k: jnp.zeros_like(v) for k, v in frozen.items()}, **grads})
    updates, opt_state = tx.update(full_grads, state.opt_state, state.params)
    updates = flax.traverse_util.flatten_dict(updates)
    new_trainable = {k: (v + updates[k]).astype(v.dtype) for k, v in trainable.items()}
    params = flax.traverse_util.unflatten_dict({**frozen, **new_trainable})
    metrics = task.train_sums(outputs, batch)
    metrics["loss"] = loss * metrics["count"]
    state = state.replace(step=state.step + 1, params=params,
                          model_state=dict(new_model_state), opt_state=opt_state)
    return state, metrics

  return train_step


def make_eval_step(module: nn.Module, task: Optional[Task] = None) -> Callable:
  """(state, batch) -> metric sums over the batch's real rows."""
  task = task or classification.make_task()

  def eval_step(state: TrainState, batch):
    outputs = module.apply({"params": state.params, **state.model_state}, batch["image"],
                           train=False)
    return task.eval_sums(outputs, batch)
  return eval_step
