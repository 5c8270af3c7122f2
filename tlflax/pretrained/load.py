"""Pretrained variables for a model: resolve the file, convert once, merge strictly.

Converted weights are cached as `.npz` (flat `params/...` and `batch_stats/...`
keys) under `$TLFLAX_CACHE_DIR` (default `~/.cache/tlflax`), so the PyTorch
file is read and converted only the first time, and never with torch.
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

import flax
import numpy as np

from tlflax.pretrained import convert_torchvision  # noqa: F401  (registers converters)
from tlflax.pretrained import convert_segmentation  # noqa: F401  (registers converters)
from tlflax.pretrained import convert_efficientnet_pytorch  # noqa: F401  (registers)
from tlflax.pretrained import sources
from tlflax.pretrained.convert_torchvision import CONVERTERS, Flat
from tlflax.pretrained.pth import load_state_dict
from tlflax.pretrained.weights import WeightConfig

log = logging.getLogger(__name__)
CACHE_FORMAT = 1  # Bump when the converted layout changes, to invalidate caches.


def cache_dir() -> Path:
  return Path(os.environ.get("TLFLAX_CACHE_DIR", os.path.expanduser("~/.cache/tlflax"))) / "converted"


def _save_npz(path: Path, flat: Flat) -> None:
  """Atomic write: a crash mid-write never leaves a truncated cache entry."""
  path.parent.mkdir(parents=True, exist_ok=True)
  with tempfile.NamedTemporaryFile(dir=path.parent, delete=False, suffix=".tmp") as tmp:
    np.savez(tmp, **flat)
  os.replace(tmp.name, path)


def _cache_path(cache_key: str) -> Path:
  return cache_dir() / f"{cache_key}.v{CACHE_FORMAT}.npz"


def _cached_convert(source: Path, converter: str, cache_key: str) -> Flat:
  cached = _cache_path(cache_key)
  if cached.is_file():
    with np.load(cached) as data:
      return {k: data[k] for k in data.files}
  flat = CONVERTERS.get(converter)(load_state_dict(source))
  try:
    _save_npz(cached, flat)
  except OSError as e:  # A read-only home must not stop training.
    log.warning("Could not cache converted weights at %s: %s", cached, e)
  return flat


def converted_weight(weight: WeightConfig, weights_dir: Optional[str] = None) -> Flat:
  """Flat converted variables of a registered weight (cache first, then the file)."""
  cache_key = f"{weight.tag}-{weight.sha256}"
  source = None if _cache_path(cache_key).is_file() else sources.resolve(weight, weights_dir)
  return _cached_convert(source, f"{weight.source_format}:{weight.model}", cache_key)


def converted_file(path: str, model: str, source_format: str) -> Flat:
  """Flat converted variables of an explicit checkpoint file of architecture `model`."""
  source = Path(path).expanduser()
  if not source.is_file():
    raise FileNotFoundError(f"Pretrained weight file {source} does not exist.")
  stat = source.stat()
  fingerprint = hashlib.sha256(f"{source.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode())
  return _cached_convert(source, f"{source_format}:{model}",
                         f"{source.stem}-{fingerprint.hexdigest()[:12]}")


def flatten(variables: Mapping[str, Any]) -> Dict[str, Any]:
  return {"/".join(k): v for k, v in flax.traverse_util.flatten_dict(
      flax.core.unfreeze(variables)).items()}


def unflatten(flat: Mapping[str, Any]) -> Dict[str, Any]:
  return flax.traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in flat.items()})


class PretrainedMismatchError(ValueError):
  """Checkpoint and model disagree on names or shapes outside the re-initialised head."""


def summarise_keys(keys: List[str]) -> str:
  """`head/aspp (24 tensors), head/classifier (2)`: module prefixes with tensor counts,
  short enough for a log line however deep the module tree."""
  counts: Dict[str, int] = {}
  for key in keys:
    module = "/".join(key.split("/")[1:3])  # Drop the collection (params, batch_stats).
    counts[module] = counts.get(module, 0) + 1
  return ", ".join(f"{m} ({n} tensor{'s' * (n > 1)})" for m, n in sorted(counts.items()))


def merge(variables: Mapping[str, Any], pretrained: Flat, reinit: str = r"params/head/.*",
          only: Optional[str] = None) -> Tuple[Dict[str, Any], Dict[str, List[str]]]:
  """Strictly fills `variables` from `pretrained`.

  Every model variable must come from the checkpoint with the same shape,
  except those matching `reinit` (the classifier), which keep their fresh
  initialisation when the shapes differ (a new class count) and are reported.
  Checkpoint tensors the model lacks are errors, unless they match `reinit`.
  `only` (a regex, full match) limits all of this to the keys it matches:
  model variables outside it keep their initialisation and are reported as
  re-initialised, checkpoint tensors outside it as unused. A segmentation
  model takes a classifier checkpoint's backbone this way
  (`only=r"(params|batch_stats)/backbone/.*"`), strictly, and drops its head.
  Returns the merged variables and a report {loaded, reinitialised, unused}.
  """
  target = flatten(variables)
  inside = lambda key: only is None or re.fullmatch(only, key) is not None
  report = {"loaded": [], "reinitialised": [], "unused": []}
  problems = []
  for key, value in target.items():
    source = pretrained.get(key)
    if not inside(key):
      report["reinitialised"].append(key)
    elif source is not None and tuple(source.shape) == tuple(value.shape):
      target[key] = np.asarray(source, dtype=value.dtype)
      report["loaded"].append(key)
    elif re.fullmatch(reinit, key):
      report["reinitialised"].append(key)
    elif source is None:
      problems.append(f"missing in checkpoint: {key} {tuple(value.shape)}")
    else:
      problems.append(f"shape mismatch: {key} model {tuple(value.shape)} "
                      f"checkpoint {tuple(source.shape)}")
  for key in sorted(pretrained):
    if not inside(key):
      report["unused"].append(key)
    elif key not in target:
      (report["unused"] if re.fullmatch(reinit, key) else problems).append(
          key if re.fullmatch(reinit, key) else f"unexpected in checkpoint: {key}")
  if problems:
    raise PretrainedMismatchError(
        f"{len(problems)} mismatches between checkpoint and model:\n  " + "\n  ".join(problems))
  if report["reinitialised"]:
    log.debug("Re-initialised (not in checkpoint or new shape): %s",
              summarise_keys(report["reinitialised"]))
  return unflatten(target), report
