"""Where and on what a figure was measured: machine line, git commit, dirty tree.

A figure is only worth reporting if someone can tell which code made it, so results are
stamped with the commit, and a tree with uncommitted changes is refused (or stamped
`"dirty": true` with `--allow_dirty`). Speed depends on the CPU, so the machine line names
the CPU model, the cores this process may use, and the ISA extensions XLA's CPU code uses.
"""
from __future__ import annotations

import datetime
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any, Dict, List, Sequence

ISA_FLAGS = ("avx512f", "avx2")
# Changes that are no reason to refuse: run outputs (ignored anyway, and listed here in case a
# work root is not ignored) and what reproduce itself writes (results files, README tables),
# so that several invocations can follow one another before their results are committed.
OWN_OUTPUTS = ("workdirs/", "experiments/results/", "README.md")


class DirtyTreeError(RuntimeError):
  """The tree has uncommitted changes that could have moved the figures."""


def cpu_info(path: str = "/proc/cpuinfo") -> Dict[str, Any]:
  model, flags = platform.processor() or platform.machine(), set()
  try:
    for line in Path(path).read_text().splitlines():
      key, _, value = line.partition(":")
      if key.strip() == "model name" and value.strip():
        model = value.strip()
      elif key.strip() == "flags":
        flags = set(value.split())
  except OSError:
    pass
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  isa = [f for f in ISA_FLAGS if f in flags]
  return {"cpu": model, "cores": cores, "isa": isa,
          "line": f"{model}, {cores} cores, {'+'.join(isa) or 'no avx2/avx512f'}"}


def versions() -> Dict[str, str]:
  out = {"python": platform.python_version()}
  for name in ("jax", "jaxlib"):
    try:
      out[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
      pass
  return out


def _git(repo: Path, *args: str) -> str:
  return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True,
                        timeout=30, check=True).stdout


def changed_paths(repo: Path, ignore: Sequence[str] = OWN_OUTPUTS) -> List[str]:
  """`git status --porcelain` lines that count as dirty (see OWN_OUTPUTS for what does not)."""
  lines = _git(repo, "status", "--porcelain", "--untracked-files=all").splitlines()
  paths = [line[3:].split(" -> ")[-1].strip('"') for line in lines if line.strip()]
  return [p for p in paths if not any(p == i.rstrip("/") or p.startswith(i) for i in ignore)]


def tree_state(repo: Path) -> Dict[str, Any]:
  """{"commit", "dirty", "changed"}: what a results file is stamped with."""
  try:
    commit = _git(repo, "rev-parse", "HEAD").strip()
    changed = changed_paths(repo)
  except (OSError, subprocess.SubprocessError):
    return {"commit": "unknown", "dirty": True, "changed": ["(not a git checkout)"]}
  return {"commit": commit, "dirty": bool(changed), "changed": changed}


def check_clean(state: Dict[str, Any], allow_dirty: bool) -> None:
  """Refuses to stamp figures on code that no commit holds, unless told to."""
  if state["dirty"] and not allow_dirty:
    shown = ", ".join(state["changed"][:10]) + (" ..." if len(state["changed"]) > 10 else "")
    raise DirtyTreeError(
        f"The tree has uncommitted changes ({shown}); results would be stamped with commit "
        f"{state['commit'][:12]} that does not hold the code that made them. Commit (or stash) "
        "them, or pass --allow_dirty to record the results with \"dirty\": true.")


def stamp(repo: Path) -> Dict[str, Any]:
  """Everything a results file says about where it was made, taken at the time of the run."""
  state = tree_state(repo)
  return {"commit": state["commit"], "dirty": state["dirty"],
          "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
          "machine": cpu_info(), "versions": versions()}
