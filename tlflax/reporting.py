"""Everything a run writes besides checkpoints.

  DIR/metrics.jsonl     one JSON object per eval, with `step` (appended)
  DIR/summary.json      flat metrics of the final eval, after the last step
  DIR/eval_report.json  per-class precision / recall / F1 and the confusion matrix (latest eval)
  DIR/config.json       the resolved config
  DIR/run_info.json     class names, preprocessing, model, package versions, git commit:
                        what predict, export and resume need
TensorBoard event files go to DIR through clu's metric writers.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any, Dict

PACKAGES = ("tlflax", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "tensorflow-cpu",
            "tensorflow-datasets", "ml-collections", "clu", "numpy")


def write_json(path: Path, obj: Any) -> None:
  """Atomic JSON write: readers never see half a file."""
  path.parent.mkdir(parents=True, exist_ok=True)
  with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as f:
    json.dump(obj, f, indent=2, sort_keys=True, default=str)
  os.chmod(f.name, 0o644)  # mkstemp makes 0600; results are meant to be shared.
  os.replace(f.name, path)


def append_jsonl(path: Path, obj: Dict[str, Any]) -> None:
  with open(path, "a") as f:
    f.write(json.dumps(obj, sort_keys=True) + "\n")


def package_versions() -> Dict[str, str]:
  versions = {"python": sys.version.split()[0]}
  for name in PACKAGES:
    try:
      versions[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
      pass
  return versions


def git_commit() -> str:
  """The commit of the tlflax checkout in use (with `+dirty`), or `unknown`."""
  root = Path(__file__).resolve().parent.parent
  try:
    commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                            text=True, timeout=10, check=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True, timeout=10).stdout.strip()
    return commit + ("+dirty" if dirty else "")
  except (OSError, subprocess.SubprocessError):
    return "unknown"


def read_jsonl(path: Path):
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]
