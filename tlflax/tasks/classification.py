"""Classification: loss, eval sums on device, and the metrics computed from them.

Eval steps return *sums* (never means) over the real rows of a padded batch,
so accumulating them over batches and dividing once at the end counts every
val image exactly once, whatever the batch size.
"""
from __future__ import annotations

from typing import Any, Dict, List, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax

from tlflax.tasks import TASKS, Task


def loss_fn(logits, labels, label_smoothing: float = 0.0):
  """Mean softmax cross-entropy (with optional label smoothing)."""
  num_classes = logits.shape[-1]
  targets = jax.nn.one_hot(labels, num_classes)
  if label_smoothing:
    targets = optax.smooth_labels(targets, label_smoothing)
  return optax.softmax_cross_entropy(logits, targets).mean()


def batch_loss(logits, batch, label_smoothing: float = 0.0):
  """`loss_fn`, or for a mixup/cutmix batch `lam * CE(label) + (1 - lam) * CE(mix_label)`."""
  loss = loss_fn(logits, batch["label"], label_smoothing)
  if "mix_lam" not in batch:
    return loss
  lam = batch["mix_lam"]
  return lam * loss + (1.0 - lam) * loss_fn(logits, batch["mix_label"], label_smoothing)


def train_metrics(logits, labels) -> Dict[str, jnp.ndarray]:
  """Sums for the training log: accuracy counts (loss is added by the step)."""
  return {"correct": jnp.sum(jnp.argmax(logits, -1) == labels).astype(jnp.float32),
          "count": jnp.asarray(labels.shape[0], jnp.float32)}


def eval_sums(logits, labels, mask) -> Dict[str, jnp.ndarray]:
  """Masked sums of loss, top-1, top-5 hits and the confusion matrix [true, predicted]."""
  num_classes = logits.shape[-1]
  mask = mask.astype(jnp.float32)
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  predicted = jnp.argmax(logits, -1)
  k = min(5, num_classes)
  top5 = jnp.any(jax.lax.top_k(logits, k)[1] == labels[:, None], axis=-1)
  confusion = jnp.einsum("n,ni,nj->ij", mask, jax.nn.one_hot(labels, num_classes),
                         jax.nn.one_hot(predicted, num_classes))
  return {"loss": jnp.sum(losses * mask), "correct": jnp.sum((predicted == labels) * mask),
          "top5": jnp.sum(top5 * mask), "count": jnp.sum(mask), "confusion": confusion}


def eval_metrics(sums: Dict[str, np.ndarray], class_names: List[str]) -> Dict[str, object]:
  """Final metrics from accumulated sums: flat scalars plus per-class report and matrix."""
  count = float(sums["count"])
  confusion = np.asarray(sums["confusion"], np.int64)
  true_pos = np.diag(confusion).astype(np.float64)
  predicted = confusion.sum(0)
  actual = confusion.sum(1)
  precision = np.divide(true_pos, predicted, out=np.zeros_like(true_pos), where=predicted > 0)
  recall = np.divide(true_pos, actual, out=np.zeros_like(true_pos), where=actual > 0)
  denom = precision + recall
  f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(true_pos), where=denom > 0)
  metrics = {"eval/loss": float(sums["loss"]) / count,
             "eval/accuracy": float(sums["correct"]) / count,
             "eval/top5": float(sums["top5"]) / count,
             "eval/macro_f1": float(f1.mean()),
             "eval/num_examples": int(count)}
  per_class = {name: {"precision": float(p), "recall": float(r), "f1": float(f),
                      "support": int(s)}
               for name, p, r, f, s in zip(class_names, precision, recall, f1, actual)}
  return {"scalars": metrics, "per_class": per_class, "confusion_matrix": confusion.tolist()}


def train_scalars(sums: Mapping[str, Any]) -> Dict[str, float]:
  return {"train/accuracy": float(sums["correct"]) / float(sums["count"])}


def make_task(label_smoothing: float = 0.0) -> Task:
  """Classification with softmax cross-entropy (optionally label-smoothed)."""
  return Task(
      name="classification",
      loss=lambda logits, batch: batch_loss(logits, batch, label_smoothing),
      train_sums=lambda logits, batch: train_metrics(logits, batch["label"]),
      train_scalars=train_scalars,
      eval_sums=lambda logits, batch: eval_sums(logits, batch["label"], batch["mask"]),
      eval_metrics=eval_metrics,
      main_metric="eval/accuracy")


@TASKS.register("classification")
def _from_config(config, **unused_context) -> Task:
  return make_task(config.get("label_smoothing", 0.0))
