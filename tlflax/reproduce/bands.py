"""Expected figures: `experiments/results/expected.json` = {entry: {metric: {value, tol}}}.

A run passes when every figure is within `tol` of `value`. Expectations move only through
`--accept`, which prints what moved, so that a changed figure is always a visible, reviewed
edit and never a side effect of running.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from tlflax import reporting

# The smallest band per metric family: one or two val images / a little COCOeval noise. With
# several seeds the band widens to SPREAD_FACTOR x (max - min) over the seeds when larger.
TOL_FLOORS = {"accuracy": 0.01, "AP": 0.02, "mIoU": 0.01, "pixel_accuracy": 0.01,
              "loss": 0.02}
DEFAULT_TOL = 0.02
SPREAD_FACTOR = 3.0


def tol_floor(metric: str) -> float:
  last = metric.split("/")[-1]
  last = "AP" if last.startswith("AP") else "loss" if "loss" in last else last
  return TOL_FLOORS.get(last, DEFAULT_TOL)


def band(metric: str, spread: Optional[float], old_tol: Optional[float]) -> float:
  """Tolerance for an accepted figure: from the seeds' spread when measured, else kept."""
  if spread is None:
    return old_tol if old_tol is not None else tol_floor(metric)
  wide = math.ceil(round(SPREAD_FACTOR * spread * 1000, 6)) / 1000  # Rounded up to 0.001.
  return max(tol_floor(metric), wide)


def load(path: Path) -> Dict[str, Dict[str, Dict[str, float]]]:
  if not Path(path).exists():
    return {}
  return json.loads(Path(path).read_text())


def check(name: str, metrics: Dict[str, Any],
          expected: Dict[str, Dict[str, Dict[str, float]]]) -> List[str]:
  """One line per figure outside its band (or missing); [] when all pass or none is expected."""
  failures = []
  for metric, want in sorted(expected.get(name, {}).items()):
    got = metrics.get(metric)
    if got is None:
      failures.append(f"{name}: {metric} missing from the results (expected "
                      f"{want['value']:.4f} +- {want['tol']:.4f})")
    elif abs(float(got) - want["value"]) > want["tol"] + 1e-9:
      failures.append(f"{name}: {metric} = {float(got):.4f}, outside the expected "
                      f"{want['value']:.4f} +- {want['tol']:.4f}")
  return failures


def accept(names: Sequence[str], results: Dict[str, Dict[str, Any]], path: Path,
           print_fn=print) -> Dict[str, Any]:
  """Rewrites the entries `names` of expected.json from their results; prints old -> new."""
  expected = load(path)
  for name in names:
    if name not in results:
      raise FileNotFoundError(f"{name}: no results file to accept; run `python -m "
                              f"tlflax.reproduce {name}` first.")
    record, old = results[name], expected.get(name, {})
    new = {}
    for metric, value in sorted(record["metrics"].items()):
      before = old.get(metric)
      spread = (record.get("spread") or {}).get(metric)
      tol = band(metric, spread, before["tol"] if before else None)
      new[metric] = {"value": round(float(value), 6), "tol": tol}
      was = f"{before['value']:.4f} +- {before['tol']:.4f}" if before else "(none)"
      print_fn(f"{name}: {metric}: {was} -> {value:.4f} +- {tol:.4f}"
               + (f" (seed spread {spread:.4f})" if spread is not None else ""))
    for metric in sorted(set(old) - set(new)):
      print_fn(f"{name}: {metric}: {old[metric]['value']:.4f} -> (dropped)")
    expected[name] = new
  reporting.write_json(Path(path), expected)
  return expected
