"""One run per workdir: a lock file held with flock while training.

Two runs writing the same checkpoints and metrics.jsonl would corrupt each
other silently. `DIR/.lock` holds an exclusive `flock` for the life of the run
and says who holds it (host, pid, start time). The kernel drops the flock when
its process dies, however it dies, so a lock file whose flock is free was left
by a killed run: it is stale, and the new run takes it over with a warning.
"""
from __future__ import annotations

import datetime
import errno
import fcntl
import json
import logging
import os
import socket
from pathlib import Path
from typing import Any, Dict

log = logging.getLogger(__name__)
LOCK_NAME = ".lock"


class WorkdirInUseError(RuntimeError):
  """Another live process is training in this workdir."""


def _owner() -> Dict[str, Any]:
  return {"host": socket.gethostname(), "pid": os.getpid(),
          "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def _describe(info: Dict[str, Any]) -> str:
  return f"pid {info.get('pid')} on {info.get('host')}, started {info.get('started')}"


class WorkdirLock:
  """Exclusive lock on a workdir; `release()` (or process exit) frees it."""

  def __init__(self, workdir: Path):
    self.path = Path(workdir) / LOCK_NAME
    self._file = None

  def acquire(self) -> "WorkdirLock":
    f = open(self.path, "a+")  # Never truncates a holder's description before we own the lock.
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      f.seek(0)
      holder = self._read(f)
      f.close()
      if e.errno not in (errno.EAGAIN, errno.EACCES):
        raise
      raise WorkdirInUseError(
          f"Workdir {self.path.parent} is in use by another run ({_describe(holder)}): "
          f"{self.path} is locked. Wait for that run to finish, stop it, or choose another "
          "--workdir.") from None
    f.seek(0)
    previous = self._read(f)
    if previous:
      self._warn_stale(previous)
    f.seek(0)
    f.truncate()
    json.dump(_owner(), f)
    f.flush()
    self._file = f
    return self

  @staticmethod
  def _read(f) -> Dict[str, Any]:
    try:
      return json.loads(f.read() or "{}")
    except ValueError:
      return {"pid": "?", "host": "?", "started": "? (unreadable lock file)"}

  def _warn_stale(self, info: Dict[str, Any]) -> None:
    """The flock was free, so its holder is gone; say so, with how we know."""
    same_host = info.get("host") == socket.gethostname()
    dead = same_host and isinstance(info.get("pid"), int) and not _pid_alive(info["pid"])
    why = "that process no longer exists" if dead else "it no longer holds the lock"
    log.warning("Taking over the stale lock %s left by a run that did not exit cleanly "
                "(%s): %s.", self.path,
                _describe(info), why)

  def release(self) -> None:
    """Empties the description (a clean exit leaves no stale owner) and drops the flock."""
    if self._file is None:
      return
    try:
      self._file.seek(0)
      self._file.truncate()
    except OSError:
      pass
    fcntl.flock(self._file, fcntl.LOCK_UN)
    self._file.close()
    self._file = None

  def __del__(self):  # A run that raised before its `finally` still leaves no stale owner.
    self.release()

  def __enter__(self):
    return self.acquire()

  def __exit__(self, *exc):
    self.release()


def lock(workdir) -> WorkdirLock:
  """Takes the lock of `workdir` or raises WorkdirInUseError naming the holder."""
  return WorkdirLock(Path(workdir)).acquire()
