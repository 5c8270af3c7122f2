"""A selection split carved from train, so hyperparameter search never looks at val.

`data.holdout_fraction = f > 0` replaces the dataset's eval split with a
seeded fraction f of its train split (stratified by class for classification)
and trains on the rest. Search and sweeps select on that holdout; the real
val split stays an honest final score (run again with `holdout_fraction = 0`).
"""
from __future__ import annotations

import numpy as np

from tlflax.data.source import Records, SplitSource


def _subset(records: Records, indices: np.ndarray) -> Records:
  table = {k: np.asarray(v)[indices] for k, v in records.table.items()}
  return Records(num=len(indices), decode=records.decode, table=table,
                 in_memory=records.in_memory)


def holdout_indices(labels, num: int, fraction: float, seed: int):
  """(train, holdout) index arrays: a seeded, per-class (when labels are given) split."""
  rng = np.random.RandomState(seed)
  groups = [np.arange(num)] if labels is None else [
      np.flatnonzero(labels == c) for c in np.unique(labels)]
  held = []
  for group in groups:
    take = int(round(len(group) * fraction))
    held.extend(rng.permutation(group)[:take].tolist())
  held = np.sort(np.asarray(held, np.int64))
  return np.setdiff1d(np.arange(num), held), held


def carve_holdout(source: SplitSource, fraction: float, seed: int = 0) -> SplitSource:
  """`source` with eval = a `fraction` of train and train = the rest."""
  if not 0.0 < fraction < 1.0:
    raise ValueError(f"data.holdout_fraction={fraction} must be in (0, 1); 0 turns it off.")
  records = source.records("train")
  if records.table is None:
    raise ValueError("data.holdout_fraction needs a dataset read with random access (image "
                     "folders, digits, cached datasets); for TFDS use split slices instead, "
                     "e.g. data.train_split='train[:80%]', data.eval_split='train[80%:]'.")
  labels = records.table.get("label") if source.label_kind == "class" else None
  train, held = holdout_indices(None if labels is None else np.asarray(labels), records.num,
                                fraction, seed)
  if len(held) == 0 or len(train) == 0:
    raise ValueError(f"data.holdout_fraction={fraction} of {records.num} train examples leaves "
                     "an empty split; use a larger dataset or another fraction.")
  return SplitSource.from_records(source.class_names, _subset(records, train),
                                  _subset(records, held), skipped=source.skipped,
                                  label_kind=source.label_kind)
