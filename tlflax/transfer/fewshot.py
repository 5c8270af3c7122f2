"""Few-shot linear evaluation of frozen features: k images per class, closed-form ridge.

How much a representation already knows about a new task is best read off
before any fine-tuning, with as few labels as a user would annotate by hand.
As big_vision's few-shot evaluator does, a k-shot accuracy is measured by
fitting a regularised least-squares classifier onto one-hot targets from
exactly k training images per class and taking the argmax on every eval image;
it is averaged over several seeded draws because one draw of 1 or 5 images per
class is noisy.

  features: the backbone's pooled output (what the classifier head reads),
            L2-normalised per image, then centred by the support set's mean
  targets:  one-hot in {-1, +1}; the bias (the targets' mean) is not penalised
  solve:    W = Xc^T (Xc Xc^T + l2_reg I)^-1 (Y - mean Y)   (n <= d, the usual case)
            W = (Xc^T Xc + l2_reg I)^-1 Xc^T (Y - mean Y)   (n > d)
  draws:    `support_indices(labels, k, seed, draw)`: exactly k distinct images
            of every class, a pure function of (seed, k, draw)

Used by the command `python -m tlflax.fewshot` and, during training, by
`FewShotEvaluator(config, module, pipe)(state) -> {"fewshot/5shot": ...}`.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence

import numpy as np

from tlflax.transfer import features as features_lib

DEFAULT_SHOTS = (1, 5, 10, 25)
DEFAULT_DRAWS = 5
# With L2-normalised, centred features (squared norms below 1), 1.0 is strong
# enough that ridge stays stable at 1 shot (it then tends to the nearest class
# mean), weak enough to fit at 25 shots. Chosen a priori, not tuned on eval.
DEFAULT_L2_REG = 1.0


# ---------------------------------------------------------------------------
# Features.

def pooled_features(module, x):
  """The vector the classifier head reads; a plain global mean for other models."""
  return features_lib.head_input(module, module.backbone(x, False)["stride_32"])


def feature_function(module) -> Callable:
  """jit (variables, images NHWC) -> float32 [B, D] pooled backbone features."""
  import jax  # pylint: disable=g-import-not-at-top
  if not hasattr(module, "backbone"):
    raise ValueError(f"{type(module).__name__} has no `backbone` field: few-shot features need "
                     "a tlflax model (ImageClassifier, SegmentationModel, DetectionModel).")
  return jax.jit(lambda variables, x: module.apply(variables, x, method=pooled_features))


def split_labels(pipe, split: str) -> np.ndarray:
  """int [N] class of every example of `split`, without decoding images where possible."""
  check_classification(pipe)
  records = pipe.records(split)
  if records.table is not None and "label" in records.table:
    return np.asarray(records.table["label"], np.int64)
  return np.array([int(e["label"]) for e in records.examples().map(
      lambda e: {"label": e["label"]}).as_numpy_iterator()], np.int64)


def check_classification(pipe) -> None:
  if pipe.label_kind != "class":
    raise ValueError(f"Few-shot evaluation needs one class per image, but dataset "
                     f"{pipe.config.name!r} has label_kind {pipe.label_kind!r}; use a "
                     "classification dataset (e.g. config.data.name='digits' or 'folder').")


def eval_images(pipe, split: str, indices: np.ndarray, mean: Sequence[float],
                std: Sequence[float], batch_size: int) -> Iterator[np.ndarray]:
  """Batches of the images at sorted `indices`, through the eval transform (no augmentation),
  the last one zero-padded to `batch_size` (`features.split_batches`)."""
  for images, _ in features_lib.split_batches(pipe, split, mean, std, batch_size, indices):
    yield images


def extract(features_fn: Callable, variables, pipe, split: str, indices: np.ndarray,
            mean: Sequence[float], std: Sequence[float], batch_size: int = 64) -> np.ndarray:
  """float32 [len(indices), D] features of the images at (sorted, distinct) `indices`."""
  out = [np.asarray(features_fn(variables, batch))
         for batch in eval_images(pipe, split, indices, mean, std, batch_size)]
  return np.concatenate(out)[:len(indices)]


# ---------------------------------------------------------------------------
# Draws and the ridge classifier (numpy, float64: problems are a few hundred rows).

def support_indices(labels: np.ndarray, k: int, seed: int, draw: int,
                    classes: Optional[Sequence[int]] = None) -> np.ndarray:
  """Exactly `k` distinct indices of every class (sorted by class, then index).

  A pure function of (labels, k, seed, draw): training-time evaluations and
  the command see the same images. `classes` defaults to every label present.
  """
  labels = np.asarray(labels)
  classes = np.unique(labels) if classes is None else np.asarray(classes)
  rng = np.random.default_rng([int(seed), int(k), int(draw)])
  chosen = []
  for c in classes:
    pool = np.flatnonzero(labels == c)
    if len(pool) < k:
      raise ValueError(f"Class {c} has {len(pool)} training images, fewer than {k} shots; "
                       "lower the shots or use a larger train split.")
    chosen.append(np.sort(rng.choice(pool, size=k, replace=False)))
  return np.concatenate(chosen)


def l2_normalise(x: np.ndarray) -> np.ndarray:
  x = np.asarray(x, np.float64)
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def ridge_fit(x: np.ndarray, labels: np.ndarray, num_classes: int,
              l2_reg: float = DEFAULT_L2_REG):
  """(mean, W, bias) of ridge regression onto {-1, +1} one-hot targets.

  Features are L2-normalised, then centred by their mean, so the bias is the
  targets' mean and is not penalised. The smaller of the two normal-equation
  systems is solved (n x n when there are fewer images than dimensions).
  """
  if l2_reg <= 0:
    raise ValueError(f"l2_reg={l2_reg} must be > 0 (a few shots never determine W).")
  x = l2_normalise(x)
  mean = x.mean(axis=0)
  xc = x - mean
  y = 2.0 * np.eye(num_classes)[np.asarray(labels)] - 1.0
  bias = y.mean(axis=0)
  n, d = xc.shape
  if n <= d:
    w = xc.T @ np.linalg.solve(xc @ xc.T + l2_reg * np.eye(n), y - bias)
  else:
    w = np.linalg.solve(xc.T @ xc + l2_reg * np.eye(d), xc.T @ (y - bias))
  return mean, w, bias


def ridge_scores(model, x: np.ndarray) -> np.ndarray:
  mean, w, bias = model
  return (l2_normalise(x) - mean) @ w + bias


def ridge_accuracy(train_x, train_y, test_x, test_y, num_classes: int,
                   l2_reg: float = DEFAULT_L2_REG) -> float:
  model = ridge_fit(train_x, train_y, num_classes, l2_reg)
  return float(np.mean(ridge_scores(model, test_x).argmax(-1) == np.asarray(test_y)))


def fewshot_accuracies(pool_x: Dict[int, np.ndarray], pool_labels: np.ndarray,
                       test_x: np.ndarray, test_y: np.ndarray, num_classes: int,
                       shots: Sequence[int], draws: int, seed: int = 0,
                       l2_reg: float = DEFAULT_L2_REG) -> Dict[int, List[float]]:
  """{k: [accuracy of each draw]}; `pool_x` maps a train index to its feature vector
  (only the indices some draw uses need to be present)."""
  result = {}
  for k in shots:
    accs = []
    for draw in range(draws):
      idx = support_indices(pool_labels, k, seed, draw)
      x = np.stack([pool_x[int(i)] for i in idx])
      accs.append(ridge_accuracy(x, pool_labels[idx], test_x, test_y, num_classes, l2_reg))
    result[k] = accs
  return result


def needed_indices(labels: np.ndarray, shots: Sequence[int], draws: int,
                   seed: int) -> np.ndarray:
  """Sorted union of every draw's support: the only train images to featurise."""
  return np.unique(np.concatenate([support_indices(labels, k, seed, d)
                                   for k in shots for d in range(draws)]))


def summary_scalars(accuracies: Dict[int, List[float]]) -> Dict[str, float]:
  out = {}
  for k, accs in accuracies.items():
    out[f"fewshot/{k}shot"] = float(np.mean(accs))
    out[f"fewshot/{k}shot_std"] = float(np.std(accs))
  return out


# ---------------------------------------------------------------------------
# Measuring a model on a pipeline: shared by the evaluator and the command.

class FewShot:
  """Featurises the support pool and eval split of `pipe` and scores draws on them.

  The support draws depend on the labels only, so they are fixed at
  construction and each call featurises just their union plus the eval split.
  """

  def __init__(self, pipe, mean: Sequence[float], std: Sequence[float],
               shots: Sequence[int] = DEFAULT_SHOTS, draws: int = DEFAULT_DRAWS, seed: int = 0,
               l2_reg: float = DEFAULT_L2_REG, batch_size: int = 64):
    if draws < 1 or not shots or min(shots) < 1:
      raise ValueError(f"shots={tuple(shots)} and draws={draws} must be positive.")
    self.pipe, self.mean, self.std = pipe, tuple(mean), tuple(std)
    self.shots, self.draws, self.seed = tuple(int(k) for k in shots), int(draws), int(seed)
    self.l2_reg, self.batch_size = float(l2_reg), int(batch_size)
    self.num_classes = len(pipe.class_names)
    self.train_labels = split_labels(pipe, "train")
    self.needed = needed_indices(self.train_labels, self.shots, self.draws, self.seed)
    self.test_labels = split_labels(pipe, "eval")

  def measure(self, features_fn: Callable, variables) -> Dict[int, List[float]]:
    """{k: per-draw accuracies} of the features `features_fn(variables, images)`."""
    pool = extract(features_fn, variables, self.pipe, "train", self.needed, self.mean,
                   self.std, self.batch_size)
    test = extract(features_fn, variables, self.pipe, "eval", np.arange(len(self.test_labels)),
                   self.mean, self.std, self.batch_size)
    pool_x = dict(zip(self.needed.tolist(), pool))
    return fewshot_accuracies(pool_x, self.train_labels, test, self.test_labels,
                              self.num_classes, self.shots, self.draws, self.seed, self.l2_reg)


class FewShotEvaluator:
  """Periodic few-shot evaluation during training: `evaluator(state)` -> scalars.

  Reads `config.fewshot` (every_steps, shots, draws, l2_reg, seed, batch_size)
  where present, else the defaults. `module` is the training module (its `backbone` and
  `pre_logits` give the features); `pipe` the training pipeline, whose train
  split is the support pool and whose eval split is scored.
  """

  def __init__(self, config, module, pipe, mean: Optional[Sequence[float]] = None,
               std: Optional[Sequence[float]] = None):
    from tlflax import train  # pylint: disable=g-import-not-at-top
    cfg = config.get("fewshot") or {}
    field = lambda name, default: default if cfg.get(name) is None else cfg.get(name)
    if mean is None or std is None:
      pp = train.preprocessing(config)
      mean, std = pp["mean"], pp["std"]
    self.fewshot = FewShot(pipe, mean, std, shots=field("shots", DEFAULT_SHOTS),
                           draws=field("draws", DEFAULT_DRAWS),
                           seed=field("seed", config.get("seed", 0)),
                           l2_reg=field("l2_reg", DEFAULT_L2_REG),
                           batch_size=field("batch_size", config.get("eval_batch_size", 64)))
    self.features_fn = feature_function(module)

    self.every_steps = int(field("every_steps", 0))

  def __call__(self, state) -> Dict[str, float]:
    variables = {"params": state.params, **state.model_state}
    t0 = time.time()
    scalars = summary_scalars(self.fewshot.measure(self.features_fn, variables))
    scalars["fewshot/seconds"] = time.time() - t0
    return scalars

  def at_step(self, step: int, state, writer, workdir) -> Optional[Dict[str, float]]:
    """Every `config.fewshot.every_steps` steps: evaluate, write the scalars to `writer`
    (TensorBoard) and a line to `workdir/fewshot.jsonl`; other steps do nothing."""
    import jax  # pylint: disable=g-import-not-at-top
    from tlflax import reporting  # pylint: disable=g-import-not-at-top
    if not self.every_steps or step % self.every_steps:
      return None
    scalars = self(state)
    writer.write_scalars(step, scalars)
    if jax.process_index() == 0:
      reporting.append_jsonl(Path(workdir) / "fewshot.jsonl", {"step": step, **scalars})
    logging.getLogger(__name__).info("few-shot at step %d: %s", step, ", ".join(
        f"{k}={v:.4f}" for k, v in scalars.items() if not k.endswith(("_std", "seconds"))))
    return scalars


def maybe_evaluator(config, module, pipe, mean=None, std=None) -> Optional[FewShotEvaluator]:
  """A FewShotEvaluator when `config.fewshot.every_steps` > 0, else None (the default: off)."""
  cfg = config.get("fewshot")
  if cfg is None or not cfg.get("every_steps"):
    return None
  return FewShotEvaluator(config, module, pipe, mean, std)
