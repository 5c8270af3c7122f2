"""Semantic segmentation: pixel losses, a confusion matrix on device, IoU metrics.

Model outputs are `{"out": logits [B, H, W, C], "aux": ...}` (the aux head,
when present, only adds to the training loss, as in torchvision's recipe).
Labels are int32 [B, H, W] class indices; `ignore_index` pixels (borders,
crop padding, padded eval rows) count nowhere: not in the loss, not in the
confusion matrix. Metrics are computed once from the summed confusion matrix,
so every val pixel counts exactly once whatever the batch size.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from tlflax.tasks import TASKS, Task

IGNORE_INDEX = 255


def _pixel_nll(logits, labels):
  """-log softmax(logits)[label] per pixel (labels must be valid indices)."""
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return -jnp.take_along_axis(log_probs, labels[..., None], axis=-1)[..., 0]


def _valid(labels, num_classes: int, ignore_index: int):
  """Pixels that carry a class (ignored and out-of-range labels excluded)."""
  return (labels != ignore_index) & (labels >= 0) & (labels < num_classes)


def cross_entropy(logits, labels, ignore_index: int = IGNORE_INDEX,
                  class_weights: Optional[Sequence[float]] = None):
  """Pixel cross-entropy averaged like torch's `F.cross_entropy(weight=, ignore_index=)`:
  sum(w[y] * ce) / sum(w[y]) over non-ignored pixels (0 when every pixel is ignored)."""
  num_classes = logits.shape[-1]
  valid = _valid(labels, num_classes, ignore_index)
  safe = jnp.where(valid, labels, 0)
  nll = _pixel_nll(logits, safe)
  weights = valid.astype(jnp.float32)
  if class_weights is not None:
    if len(class_weights) != num_classes:
      raise ValueError(f"class_weights has {len(class_weights)} values for {num_classes} "
                       "classes; give one weight per class.")
    weights = weights * jnp.asarray(class_weights, jnp.float32)[safe]
  return jnp.sum(nll * weights) / jnp.maximum(jnp.sum(weights), 1e-12)


def dice_loss(logits, labels, ignore_index: int = IGNORE_INDEX, smooth: float = 1.0):
  """1 - mean over classes of the soft Dice coefficient over the batch's valid pixels.

  Dice_c = (2 sum(p_c t_c) + smooth) / (sum(p_c) + sum(t_c) + smooth), with
  softmax probabilities p and one-hot targets t; `smooth` keeps classes absent
  from the batch (and from the prediction) at Dice 1 instead of 0/0.
  """
  num_classes = logits.shape[-1]
  valid = _valid(labels, num_classes, ignore_index).astype(jnp.float32)[..., None]
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1) * valid
  targets = jax.nn.one_hot(jnp.where(valid[..., 0] > 0, labels, 0), num_classes) * valid
  axes = tuple(range(logits.ndim - 1))
  intersection = jnp.sum(probs * targets, axis=axes)
  total = jnp.sum(probs, axis=axes) + jnp.sum(targets, axis=axes)
  return 1.0 - jnp.mean((2.0 * intersection + smooth) / (total + smooth))


def confusion_matrix(predicted, labels, num_classes: int, ignore_index: int = IGNORE_INDEX,
                     row_mask=None):
  """[true, predicted] pixel counts (float32) over valid pixels of the real rows."""
  valid = _valid(labels, num_classes, ignore_index)
  if row_mask is not None:
    valid = valid & (row_mask.reshape((-1,) + (1,) * (labels.ndim - 1)) > 0)
  index = jnp.where(valid, labels * num_classes + predicted, 0).reshape(-1)
  counts = jnp.zeros((num_classes * num_classes,), jnp.float32).at[index].add(
      valid.reshape(-1).astype(jnp.float32))
  return counts.reshape(num_classes, num_classes)


def iou_metrics(confusion: np.ndarray, class_names: List[str]) -> Dict[str, Any]:
  """IoU, Dice and pixel accuracy from a [true, predicted] confusion matrix.

  mIoU is the mean over the config's classes; a class with no pixel in either
  the labels or the predictions has no IoU and is left out of the mean (and
  reported as None), which only happens when the val split lacks the class.
  """
  confusion = np.asarray(confusion, np.float64)
  true_pos = np.diag(confusion)
  union = confusion.sum(0) + confusion.sum(1) - true_pos
  present = union > 0
  iou = np.divide(true_pos, union, out=np.full_like(true_pos, np.nan), where=present)
  dice = np.divide(2 * true_pos, union + true_pos, out=np.full_like(true_pos, np.nan),
                   where=present)
  total = confusion.sum()
  scalars = {"eval/mIoU": float(np.nanmean(iou)) if present.any() else 0.0,
             "eval/mDice": float(np.nanmean(dice)) if present.any() else 0.0,
             "eval/pixel_accuracy": float(true_pos.sum() / total) if total else 0.0}
  per_class = {name: {"IoU": None if np.isnan(i) else float(i),
                      "Dice": None if np.isnan(d) else float(d),
                      "pixels": int(confusion[c].sum())}
               for c, (name, i, d) in enumerate(zip(class_names, iou, dice))}
  return {"scalars": scalars, "per_class": per_class,
          "confusion_matrix": confusion.astype(np.int64).tolist()}


def make_task(num_classes: Optional[int] = None, ignore_index: int = IGNORE_INDEX,
              ce_weight: float = 1.0, dice_weight: float = 0.0, aux_weight: float = 0.5,
              class_weights: Optional[Sequence[float]] = None) -> Task:
  """Segmentation with `ce_weight * CE + dice_weight * Dice` (+ `aux_weight` * CE of aux)."""
  if ce_weight < 0 or dice_weight < 0 or ce_weight + dice_weight <= 0:
    raise ValueError(f"ce_weight={ce_weight}, dice_weight={dice_weight}: both must be >= 0 "
                     "and at least one > 0.")

  def pixel_loss(logits, labels):
    loss = 0.0
    if ce_weight:
      loss += ce_weight * cross_entropy(logits, labels, ignore_index, class_weights)
    if dice_weight:
      loss += dice_weight * dice_loss(logits, labels, ignore_index)
    return loss

  def loss(outputs, batch):
    total = pixel_loss(outputs["out"], batch["label"])
    if "aux" in outputs and aux_weight:
      total += aux_weight * cross_entropy(outputs["aux"], batch["label"], ignore_index,
                                          class_weights)
    return total

  def train_sums(outputs, batch):
    logits, labels = outputs["out"], batch["label"]
    valid = _valid(labels, logits.shape[-1], ignore_index)
    hits = (jnp.argmax(logits, -1) == labels) & valid
    return {"pixels_correct": jnp.sum(hits).astype(jnp.float32),
            "pixels": jnp.sum(valid).astype(jnp.float32),
            "count": jnp.asarray(labels.shape[0], jnp.float32)}

  def train_scalars(sums):
    return {"train/pixel_accuracy": float(sums["pixels_correct"]) / max(float(sums["pixels"]), 1)}

  def eval_sums(outputs, batch):
    logits, labels, rows = outputs["out"], batch["label"], batch["mask"]
    classes = logits.shape[-1]
    valid = _valid(labels, classes, ignore_index) & (rows[:, None, None] > 0)
    nll = _pixel_nll(logits, jnp.where(valid, labels, 0))
    return {"loss": jnp.sum(nll * valid), "pixels": jnp.sum(valid).astype(jnp.float32),
            "count": jnp.sum(rows),
            "confusion": confusion_matrix(jnp.argmax(logits, -1), labels, classes, ignore_index,
                                          rows)}

  def eval_metrics(sums, class_names):
    if num_classes is not None and len(class_names) != num_classes:
      raise ValueError(f"{len(class_names)} class names for {num_classes} classes.")
    result = iou_metrics(sums["confusion"], class_names)
    result["scalars"]["eval/loss"] = float(sums["loss"]) / max(float(sums["pixels"]), 1)
    result["scalars"]["eval/num_examples"] = int(sums["count"])
    return result

  return Task("segmentation", loss, train_sums, train_scalars, eval_sums, eval_metrics,
              main_metric="eval/mIoU")


@TASKS.register("segmentation")
def _from_config(config, **unused_context) -> Task:
  seg = config.segmentation
  return make_task(ignore_index=config.data.get("ignore_index", IGNORE_INDEX),
                   ce_weight=seg.ce_weight, dice_weight=seg.dice_weight,
                   aux_weight=seg.aux_weight if seg.aux else 0.0,
                   class_weights=tuple(seg.class_weights) if seg.class_weights else None)
