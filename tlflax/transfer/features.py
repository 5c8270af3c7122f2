"""Frozen features of a zoo backbone on a dataset's train and eval splits.

What transferability scores read: for each image, the global-average-pooled
feature map at chosen depths (`stride_16`, `stride_32`, or `pre_logits`, the
vector the classifier reads) and, for LEEP, the probabilities of the model's
own ImageNet classifier. Images go through the experiment's data pipeline
(`tlflax.data.build`) with the *eval* transform on both splits, normalised with
the candidate's own pretrained mean/std: the features a frozen backbone would
see at test time, with no augmentation noise in the scores.

One forward pass per batch gives every depth at once; batches are padded to
one size so the extractor compiles once per model.
"""
from __future__ import annotations

import dataclasses
import functools
import time
from typing import Dict, Iterator, Optional, Sequence, Tuple

import numpy as np

from tlflax.pretrained import weights as weights_lib

PRE_LOGITS = "pre_logits"
RANDOM = "random"  # The weight name of a randomly initialised control.


@dataclasses.dataclass(frozen=True)
class Candidate:
  """One backbone to score: a model name and a weight tag, or RANDOM for a control."""
  model: str
  weight: str  # "mobilenet_v2.tv_in1k" or RANDOM.

  @property
  def is_random(self) -> bool:
    return self.weight == RANDOM

  @property
  def name(self) -> str:
    return f"{self.model}.{RANDOM}" if self.is_random else self.weight

  def mean_std(self) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    """The pretrained weight's normalisation; ImageNet's for a random control (as train.py)."""
    if self.is_random:
      return weights_lib.IMAGENET_MEAN, weights_lib.IMAGENET_STD
    weight = weights_lib.WEIGHTS.get(self.weight)
    return tuple(weight.mean), tuple(weight.std)


@dataclasses.dataclass
class SplitFeatures:
  """Pooled features per depth ([n, dim] float32), labels [n], and the probabilities [n, Z]
  of the model's own head (ImageNet's 1000 classes; a random control's head is random,
  so its LEEP shows what uninformative source labels score)."""
  features: Dict[str, np.ndarray]
  labels: np.ndarray
  source_probs: np.ndarray


@dataclasses.dataclass
class Extracted:
  train: SplitFeatures
  val: SplitFeatures
  seconds: float  # Wall time of loading the model and both passes.


def load_model(candidate: Candidate, weights_dir: Optional[str] = None, seed: int = 0):
  """(module, variables) with the ImageNet head kept (LEEP reads it)."""
  from tlflax import models  # pylint: disable=g-import-not-at-top
  pretrained = False if candidate.is_random else candidate.weight
  return models.create_model(candidate.model, pretrained=pretrained, weights_dir=weights_dir,
                             seed=seed)


def head_input(module, last):
  """float32 [B, D]: what the classifier head reads from the `stride_32` map `last` (its
  `pre_logits`, else the global mean, taken in float32 so bf16 maps average exactly)."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  pre_logits = getattr(module, "pre_logits", None)
  if pre_logits is None:
    return jnp.mean(last.astype(jnp.float32), axis=(1, 2))
  return pre_logits(last, False).astype(jnp.float32)


def _forward(module, x, depths: Tuple[str, ...]):
  """Pooled maps at `depths` and the head's probabilities, from one backbone pass."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  maps = module.backbone(x, False)
  unknown = [d for d in depths if d != PRE_LOGITS and d not in maps]
  if unknown:
    raise ValueError(f"Depth(s) {unknown} are not outputs of {type(module.backbone).__name__}; "
                     f"choose from {sorted(maps) + [PRE_LOGITS]}.")
  pre = head_input(module, maps["stride_32"])
  pooled = {d: pre if d == PRE_LOGITS else jnp.mean(maps[d], axis=(1, 2)).astype(jnp.float32)
            for d in depths}
  head = module.variables["params"]["head"]
  logits = pre.astype(jnp.float32) @ head["kernel"] + head["bias"]
  return pooled, jax.nn.softmax(logits, axis=-1)


def make_extractor(module, depths: Sequence[str]):
  """jit(variables, images [B, S, S, 3]) -> ({depth: [B, dim]}, probs [B, Z])."""
  import jax  # pylint: disable=g-import-not-at-top
  fn = functools.partial(_forward, depths=tuple(depths))
  return jax.jit(lambda variables, x: module.apply(variables, x, method=fn))


def split_batches(pipe, split: str, mean, std, batch_size: int,
                  indices: Optional[np.ndarray] = None
                  ) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
  """(images [B, S, S, 3] float32, labels [b]) of `split` ("train" / "eval") in its fixed
  order, through the pipeline's eval transform with this mean/std; the last batch is
  zero-padded to B rows (labels keep only the real ones), so one compilation serves all.

  `indices` (strictly increasing) keeps only those examples: the few-shot support pool.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from tlflax.data import pipeline  # pylint: disable=g-import-not-at-top
  records = pipe.records(split)
  transform = pipeline.TRANSFORMS[pipe.label_kind].eval_transform(pipe.config, mean, std)
  rows = records.rows() if indices is None else _selected_rows(records, indices)
  examples = rows.map(lambda row: transform(records.decode(row)),
                      num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  for batch in examples.batch(batch_size).prefetch(tf.data.AUTOTUNE).as_numpy_iterator():
    images, labels = batch["image"], batch["label"]
    if len(images) < batch_size:
      pad = np.zeros((batch_size - len(images),) + images.shape[1:], images.dtype)
      images = np.concatenate([images, pad])
    yield images, labels


def _selected_rows(records, indices: np.ndarray):
  """The undecoded rows at `indices`, in order: gathered from a table, filtered from a stream."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  indices = np.asarray(indices, np.int64)
  if np.any(np.diff(indices) <= 0):
    raise ValueError("split_batches needs strictly increasing indices.")
  if records.table is not None:
    return tf.data.Dataset.from_tensor_slices({k: v[indices] for k, v in records.table.items()})
  wanted = tf.constant(indices)
  return records.stream.enumerate().filter(
      lambda i, _: tf.reduce_any(tf.equal(i, wanted))).map(lambda _, row: row)


def extract_split(extractor, variables, pipe, split: str, mean, std, batch_size: int,
                  progress) -> SplitFeatures:
  pooled, probs, labels = [], [], []
  for images, batch_labels in split_batches(pipe, split, mean, std, batch_size):
    feats, p = extractor(variables, images)
    n = len(batch_labels)
    pooled.append({d: np.asarray(v[:n]) for d, v in feats.items()})
    probs.append(np.asarray(p[:n], np.float64))
    labels.append(batch_labels)
    progress.update(n)
  if not labels:
    raise ValueError(f"The {split} split of dataset {pipe.config.name!r} is empty.")
  features = {d: np.concatenate([b[d] for b in pooled]) for d in pooled[0]}
  return SplitFeatures(features, np.concatenate(labels).astype(np.int64), np.concatenate(probs))


def extract(candidate: Candidate, pipe, depths: Sequence[str], *, batch_size: int = 32,
            weights_dir: Optional[str] = None, seed: int = 0) -> Extracted:
  """Features of both splits for one candidate, with a progress bar over images.

  `pipe` is a `tlflax.data.Pipeline` of a classification dataset (its train split
  and its eval split, the holdout when `holdout_fraction` is set).
  """
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  if pipe.label_kind != "class":
    raise ValueError(f"Dataset {pipe.config.name!r} has label_kind {pipe.label_kind!r}: "
                     "transferability scores need one class label per image.")
  start = time.time()
  module, variables = load_model(candidate, weights_dir, seed)
  extractor = make_extractor(module, depths)
  mean, std = candidate.mean_std()
  with tqdm(total=pipe.num_train + pipe.num_eval, unit="img", dynamic_ncols=True,
            desc=candidate.name, mininterval=1.0) as progress:
    train = extract_split(extractor, variables, pipe, "train", mean, std, batch_size, progress)
    val = extract_split(extractor, variables, pipe, "eval", mean, std, batch_size, progress)
  return Extracted(train, val, time.time() - start)
