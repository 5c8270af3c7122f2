"""README "Results" tables, written from the results files between marker comments.

    <!-- reproduce:classification -->
    ... (generated; edits here are overwritten)
    <!-- /reproduce:classification -->

A figure in the README is a copy of a results file, never typed: an entry without one says
"not re-made", so the tables cannot drift from what the current code measured.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

from tlflax import experiments
from tlflax.reproduce.entries import TABLES, Entry

NOT_MADE = "not re-made"
HEADERS = {"classification": "final val accuracy",
           "segmentation": "final val mIoU (best)",
           "detection": "final val AP / AP50 / AP75 (COCOeval)"}


def _accuracy(entry: Entry, record: Dict[str, Any]) -> str:
  value = record["metrics"][entry.metrics[0]]
  total = (record.get("summary") or {}).get("eval/num_examples")
  return f"{value:.3f}" + (f" ({round(value * total)}/{total})" if total else "")


def _miou(entry: Entry, record: Dict[str, Any]) -> str:
  value, best = record["metrics"][entry.metrics[0]], (record.get("best") or {}).get(
      entry.metrics[0])
  return f"{value:.3f}" + (f" ({best:.3f})" if best is not None else "")


def _ap(entry: Entry, record: Dict[str, Any]) -> str:
  return " / ".join(f"{record['metrics'][m]:.3f}" for m in entry.metrics)


FIGURE: Dict[str, Callable[[Entry, Dict[str, Any]], str]] = {
    "classification": _accuracy, "segmentation": _miou, "detection": _ap}


def measured(record: Dict[str, Any]) -> str:
  """Commit, date and cores: enough to tell a stale or dirty figure at a glance."""
  commit = str(record.get("commit", "?"))[:7] + (" dirty" if record.get("dirty") else "")
  cores = (record.get("machine") or {}).get("cores")
  return f"`{commit}`, {str(record.get('date', '?'))[:10]}" + (f", {cores} cores" if cores else "")


def row(entry: Entry, record: Optional[Dict[str, Any]]) -> Dict[str, str]:
  cells = {"entry": f"`{entry.name}`", "config": entry.label, "what": entry.what}
  if record is None or not all(m in record.get("metrics", {}) for m in entry.metrics):
    return dict(cells, figure=NOT_MADE, wall="-", measured="-")
  figure = FIGURE[entry.table](entry, record)
  wall = f"{record['wall_s']:.0f} s"
  if record.get("seeds"):
    figure += f" (mean of {len(record['seeds'])} seeds)"
    wall += f" ({len(record['seeds'])} runs)"
  return dict(cells, figure=figure, wall=wall, measured=measured(record))


def table(kind: str, entries: Sequence[Entry], results: Dict[str, Dict[str, Any]]) -> str:
  rows = [row(e, results.get(e.name)) for e in entries if e.table == kind]
  header = {"entry": "entry", "config": "config", "what": "what", "figure": HEADERS[kind],
            "wall": "wall time (whole command)", "measured": "measured (commit, date, cores)"}
  return experiments.markdown_table([{header[k]: v for k, v in r.items()} for r in rows],
                                    list(header.values()))


def update(path: Path, entries: Sequence[Entry], results: Dict[str, Dict[str, Any]],
           kinds: Sequence[str] = TABLES) -> List[str]:
  """Rewrites each marked table in `path`; a missing marker is an error naming it."""
  text = Path(path).read_text()
  for kind in kinds:
    pattern = re.compile(rf"(<!-- reproduce:{kind} -->\n).*?(<!-- /reproduce:{kind} -->)",
                         re.DOTALL)
    if not pattern.search(text):
      raise ValueError(f"{path} has no '<!-- reproduce:{kind} -->' ... "
                       f"'<!-- /reproduce:{kind} -->' markers for the {kind} table.")
    body = table(kind, entries, results)
    text = pattern.sub(lambda m, b=body: m.group(1) + b + "\n" + m.group(2), text)
  Path(path).write_text(text)
  return list(kinds)
