"""One small registry class, shared by models, datasets, weights and tasks.

A registry maps a name to a callable (or a description). Unknown names fail
with the closest registered names, so a typo in a config says how to fix it.
"""
from __future__ import annotations

import difflib
import fnmatch
from typing import Any, Callable, Dict, Iterator, List, Optional


class Registry:
  """A named table of entries with decorator registration."""

  def __init__(self, kind: str):
    self.kind = kind
    self._entries: Dict[str, Any] = {}

  def register(self, name: str, entry: Any = None):
    """Registers `entry` under `name`; used bare as a decorator when entry is None."""
    if entry is not None:
      self._add(name, entry)
      return entry

    def decorator(fn: Callable) -> Callable:
      self._add(name, fn)
      return fn

    return decorator

  def _add(self, name: str, entry: Any) -> None:
    if name in self._entries:
      raise ValueError(f"{self.kind} {name!r} is registered twice.")
    self._entries[name] = entry

  def get(self, name: str) -> Any:
    try:
      return self._entries[name]
    except KeyError:
      raise KeyError(self.unknown_message(name)) from None

  def unknown_message(self, name: str) -> str:
    close = difflib.get_close_matches(name, list(self._entries), n=5, cutoff=0.5)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    return (f"Unknown {self.kind} {name!r}.{hint} "
            f"Known {self.kind}s: {', '.join(sorted(self._entries))}.")

  def names(self, pattern: Optional[str] = None) -> List[str]:
    """Sorted names, optionally filtered by a shell-style wildcard (`resnet*`)."""
    names = sorted(self._entries)
    if pattern:
      names = [n for n in names if fnmatch.fnmatch(n, pattern)]
    return names

  def __contains__(self, name: str) -> bool:
    return name in self._entries

  def __iter__(self) -> Iterator[str]:
    return iter(self.names())
