"""Sweeps, results tables and plots, hyperparameter search: the research workflow.

A sweep file is Python in `experiments/` whose `get_sweep()` returns a dict:

  base                  the base config: "configs/FILE.py[:ARG]" (a path relative to
                        the current directory, as `--config` takes it) or a ConfigDict
  runs                  optional list of override dicts, one per variant; "name" names
                        it, "config" swaps the config file/argument for that variant
  grid                  optional {dotted field: [values]}; the product is crossed with
                        `runs` (an axis named "seed" makes seeds: results are also
                        averaged over it)
  overrides             optional {dotted field: value} applied to every run
  add_scratch_baseline  False; True adds, per variant, the same run with
                        `model.pretrained=False` ("<variant>_scratch"); an override dict
                        adds one shared scratch variant (that dict + pretrained False,
                        named by its "name", default "scratch") that every variant is
                        compared with. The table gets `transfer_gain` (variant metric
                        minus its scratch partner's, same grid values and seed) and
                        flags negative transfer.
  metric                optional summary.json key of the main metric (default:
                        eval/accuracy, eval/mIoU or eval/AP, whichever exists)
  search                instead of runs/grid: a hyperparameter search (see `SEARCH_KEYS`)
  name                  optional sweep name (default: the file's stem)

Each run is `python -m tlflax.main --config SPEC --workdir ROOT/<sweep>/<run>
--config.a.b=VALUE ...` in a subprocess, so runs are isolated and the same command
resumes an interrupted run. A run is skipped when its `summary.json` exists and was
written for the same request (config spec + overrides, kept in `sweep_run.json`).
Each run's output goes to `<run>/log.txt`. Results: `ROOT/<sweep>/results.{csv,md}`,
`results_by_variant.csv` with a seed axis, and PNG plots.

Fields that the command line cannot set (lists such as `optim.rules`, None) fail at
planning time; put such alternatives in the config file behind a config argument and
vary "config": ["configs/x.py:a", "configs/x.py:b"].
"""
from __future__ import annotations

import copy
import csv
import dataclasses
import datetime
import fnmatch
import importlib.util
import itertools
import json
import logging
import math
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

log = logging.getLogger("tlflax.experiments")

SWEEP_KEYS = ("name", "base", "runs", "grid", "overrides", "add_scratch_baseline", "metric",
              "search")
# search = {"space": {field: ("log_uniform", lo, hi) | ("uniform", lo, hi) | ("int", lo, hi)
#                     | ("log_int", lo, hi) | ("choice", [values])},
#           "method": "tpe" | "random" | "grid", "num_trials": N (grid: the grid's size),
#           "metric": summary.json key (default: the main metric), "direction":
#           "maximize" | "minimize" (default: minimize for *loss*), "pruner": "median" |
#           None (default: median for tpe), "seed": 0, "start": [param dicts tried first],
#           "selection": "auto" | "holdout" | "val", "holdout_fraction": 0.2,
#           "grid_points": 3 (per range axis, grid method), "n_startup_trials": None,
#           "final_run": True (retrain the best config on full train, score on val)}
SEARCH_KEYS = ("space", "method", "num_trials", "metric", "direction", "pruner", "seed",
               "start", "selection", "holdout_fraction", "grid_points", "n_startup_trials",
               "final_run")
MAIN_METRICS = ("eval/accuracy", "eval/mIoU", "eval/AP")
CONFIG_KEY, NAME_KEY, SEED_KEY, PRETRAINED = "config", "name", "seed", "model.pretrained"
RECORD, LOG_FILE = "sweep_run.json", "log.txt"
GENERATED_BASE = "base_config.py"  # Written when the base is a ConfigDict.
CLI_TYPES = (bool, int, float, str, tuple)


# ----------------------------------------------------------------------------
# Sweep files.


@dataclasses.dataclass
class Sweep:
  """A parsed sweep file (see the module docstring for the keys)."""
  name: str
  base: Any  # "file.py[:arg]" or a ConfigDict.
  runs: List[Dict[str, Any]] = dataclasses.field(default_factory=list)
  grid: Dict[str, List[Any]] = dataclasses.field(default_factory=dict)
  overrides: Dict[str, Any] = dataclasses.field(default_factory=dict)
  add_scratch_baseline: Any = False
  metric: Optional[str] = None
  search: Optional[Dict[str, Any]] = None
  path: Optional[Path] = None  # The sweep file, when loaded from one.


def make_sweep(spec: Dict[str, Any], name: Optional[str] = None,
               path: Optional[Path] = None) -> Sweep:
  """Checks a `get_sweep()` dict and returns a `Sweep`."""
  if not isinstance(spec, dict):
    raise TypeError(f"get_sweep() must return a dict with keys {SWEEP_KEYS}, got {type(spec)}.")
  unknown = sorted(set(spec) - set(SWEEP_KEYS))
  if unknown:
    raise ValueError(f"Unknown sweep key(s) {unknown}; known: {', '.join(SWEEP_KEYS)}.")
  if "base" not in spec:
    raise ValueError("A sweep needs `base`: a config spec 'configs/x.py[:arg]' or a ConfigDict.")
  sweep = Sweep(name=spec.get("name") or name or "sweep", base=spec["base"],
                runs=[dict(r) for r in spec.get("runs") or []],
                grid={k: list(v) for k, v in (spec.get("grid") or {}).items()},
                overrides=dict(spec.get("overrides") or {}),
                add_scratch_baseline=spec.get("add_scratch_baseline", False),
                metric=spec.get("metric"), search=spec.get("search"), path=path)
  if not re.fullmatch(r"[A-Za-z0-9._=+-]+", sweep.name):
    raise ValueError(f"Sweep name {sweep.name!r}: use letters, digits and ._=+- only.")
  for key, values in sweep.grid.items():
    if not values:
      raise ValueError(f"grid[{key!r}] is empty; give at least one value.")
  if sweep.search is not None:
    if sweep.runs or sweep.grid or sweep.add_scratch_baseline:
      raise ValueError("A sweep has either `search` or `runs`/`grid`/`add_scratch_baseline`.")
    unknown = sorted(set(sweep.search) - set(SEARCH_KEYS))
    if unknown:
      raise ValueError(f"Unknown search key(s) {unknown}; known: {', '.join(SEARCH_KEYS)}.")
    if not sweep.search.get("space"):
      raise ValueError("search needs a `space`: {field: ('log_uniform', lo, hi), ...}.")
  return sweep


def load_sweep(path: Union[str, Path]) -> Sweep:
  """Imports a sweep file and calls its `get_sweep()`."""
  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"Sweep file {path} does not exist.")
  module_spec = importlib.util.spec_from_file_location(f"_tlflax_sweep_{path.stem}", path)
  if module_spec is None:
    raise ValueError(f"Sweep file {path} cannot be loaded (a .py file?).")
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if not hasattr(module, "get_sweep"):
    raise ValueError(f"Sweep file {path} defines no get_sweep().")
  return make_sweep(module.get_sweep(), name=path.stem, path=path.resolve())


def sweep_base_config(path: Union[str, Path]):
  """The base ConfigDict of a sweep file (what generated `base_config.py` files call)."""
  sweep = load_sweep(path)
  if isinstance(sweep.base, str):
    return load_config(sweep.base)
  return copy.deepcopy(sweep.base)


# ----------------------------------------------------------------------------
# Configs and overrides.

_CONFIG_CACHE: Dict[str, Any] = {}


def load_config(spec: str):
  """`file.py[:arg]` -> a fresh ConfigDict (loaded once per process, then copied)."""
  from tlflax.config import load_config_file  # pylint: disable=g-import-not-at-top
  path = spec.partition(":")[0]
  if not Path(path).is_file():
    raise FileNotFoundError(f"Config file {path!r} (from {spec!r}) does not exist; paths are "
                            f"relative to the current directory {os.getcwd()}.")
  if spec not in _CONFIG_CACHE:
    _CONFIG_CACHE[spec] = load_config_file(spec)
  return copy.deepcopy(_CONFIG_CACHE[spec])


def apply_overrides(config, overrides: Dict[str, Any], where: str = "overrides"):
  """Sets dotted fields as `--config.a.b=VALUE` would; unknown fields and types fail."""
  from ml_collections.config_flags import config_path  # pylint: disable=g-import-not-at-top
  from tlflax.config import check_field_path  # pylint: disable=g-import-not-at-top
  for path, value in overrides.items():
    check_field_path(config, path)
    try:
      config_path.set_value(path, config, value)
    except (TypeError, ValueError, KeyError) as e:
      raise ValueError(f"{where}: cannot set {path}={value!r}: {e}") from None
  return config


def cli_value(config, path: str, value: Any) -> str:
  """`value` as `--config.<path>=...` text; fields the command line cannot set fail."""
  from ml_collections.config_flags import config_path  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top
  field_type = config_path.get_type(path, config)
  if value is None:
    raise ValueError(f"{path}=None cannot be passed on the command line; set it in the "
                     "config file and vary 'config' instead.")
  if isinstance(field_type, type) and issubclass(field_type, ml_collections.ConfigDict):
    return repr(dict(value))
  if field_type not in CLI_TYPES:
    raise ValueError(
        f"{path} is a {field_type.__name__} field, which --config.{path}=... cannot set "
        "(ml_collections parses bool, int, float, str, tuple and dict fields only). Put the "
        "alternatives in the config file behind a config argument and vary "
        "'config': ['configs/x.py:a', 'configs/x.py:b'].")
  if field_type is bool:
    return "true" if value else "false"
  if field_type is tuple:
    return repr(tuple(value))
  if field_type is str:
    return str(value)
  return repr(value)


def fmt_value(key: str, value: Any) -> str:
  """A short, file-name-safe text for a value in run names and tables."""
  if key == CONFIG_KEY and isinstance(value, str):
    path, _, arg = value.partition(":")
    text = arg or Path(path).stem
  elif isinstance(value, bool):
    text = str(value)
  elif isinstance(value, float):
    text = f"{value:g}"
  elif isinstance(value, (tuple, list)):
    text = "-".join(fmt_value("", v) for v in value)
  else:
    text = str(value)
  return re.sub(r"[^A-Za-z0-9._+-]+", "-", text).strip("-") or "x"


# ----------------------------------------------------------------------------
# Planning: runs, names, scratch partners.


@dataclasses.dataclass
class Run:
  """One subprocess of a sweep."""
  name: str
  config: str  # --config spec ("<sweep base>" for a generated base_config.py).
  overrides: Dict[str, Any]  # Dotted field -> value, in the order they apply.
  varied: Dict[str, Any]  # Table columns: the axes' values for this run.
  variant: str  # The name without its seed part (what seeds average over).
  workdir: Path
  seed: Any = None
  scratch: bool = False
  baseline: Optional[str] = None  # Name of the scratch run this run is compared with.
  cli: Dict[str, str] = dataclasses.field(default_factory=dict)  # Overrides as CLI text.
  final_steps: Optional[int] = None  # config.total_steps, when the config sets it.

  def request(self) -> Dict[str, Any]:
    """What makes a finished workdir count as this run: config spec + overrides."""
    return {"config": self.config, "overrides": dict(self.cli)}


BASE_MARK = "<sweep base>"


def short_names(keys: Sequence[str]) -> Dict[str, str]:
  """Dotted field -> its last component, unless two fields share it."""
  last = [k.split(".")[-1] for k in keys]
  return {k: (s if last.count(s) == 1 else k) for k, s in zip(keys, last)}


def entry_name(entry: Dict[str, Any], short: Dict[str, str]) -> str:
  if entry.get(NAME_KEY):
    return fmt_value("", entry[NAME_KEY])
  parts = []
  for key, value in entry.items():
    if key == NAME_KEY:
      continue
    parts.append(fmt_value(key, value) if key == CONFIG_KEY else
                 f"{short.get(key, key)}={fmt_value(key, value)}")
  return "_".join(parts)


def sweep_dir(sweep: Sweep, root: Union[str, Path]) -> Path:
  return Path(root).resolve() / sweep.name


def plan(sweep: Sweep, root: Union[str, Path]) -> List[Run]:
  """All runs of a grid/list sweep, validated: unknown fields fail here, before any run."""
  if sweep.search is not None:
    raise ValueError(f"Sweep {sweep.name!r} is a search; use run_search().")
  entries = [dict(e) for e in sweep.runs] or [{}]
  scratch = sweep.add_scratch_baseline
  if scratch not in (False, None, True) and not isinstance(scratch, dict):
    raise ValueError("add_scratch_baseline is True, False or an override dict.")
  shared = [dict(scratch)] if isinstance(scratch, dict) else []
  entry_keys = [k for e in entries + shared for k in e if k not in (NAME_KEY, PRETRAINED)]
  axis_keys = list(dict.fromkeys(entry_keys + list(sweep.grid)))
  short = short_names(axis_keys)
  scratch_entries = []
  if scratch is True:
    for entry in entries:
      base_name = entry_name(entry, short)
      scratch_entries.append(dict(entry, **{PRETRAINED: False, NAME_KEY: (
          f"{base_name}_scratch" if base_name else "scratch")}))
  for extra in shared:
    extra[PRETRAINED] = False
    extra.setdefault(NAME_KEY, "scratch")
    scratch_entries.append(extra)
  base_dir = sweep_dir(sweep, root)
  runs: List[Run] = []
  combos = [dict(zip(sweep.grid, values)) for values in itertools.product(*sweep.grid.values())]
  for index, entry in enumerate(entries + scratch_entries):
    is_scratch = index >= len(entries)
    ename = entry_name(entry, short)
    for combo in combos:
      grid_parts = [f"{short[k]}={fmt_value(k, v)}" for k, v in combo.items()]
      seed_parts = [p for k, p in zip(combo, grid_parts) if k == SEED_KEY]
      other = [p for k, p in zip(combo, grid_parts) if k != SEED_KEY]
      variant = "_".join([p for p in [ename] + other if p]) or "run"
      name = "_".join([variant] + seed_parts)
      overrides = dict(sweep.overrides)
      overrides.update({k: v for k, v in entry.items() if k not in (NAME_KEY, CONFIG_KEY)})
      overrides.update(combo)
      varied = {k: (fmt_value(k, entry[k]) if k == CONFIG_KEY else entry[k])
                for k in axis_keys if k in entry}
      varied.update(combo)
      seed = combo.get(SEED_KEY, entry.get(SEED_KEY, sweep.overrides.get(SEED_KEY)))
      runs.append(Run(name=name, config=entry.get(CONFIG_KEY) or _base_spec(sweep),
                      overrides=overrides, varied=varied, variant=variant,
                      workdir=base_dir / name, seed=seed, scratch=is_scratch))
  _pair_scratch(runs, sweep, len(entries), len(combos))
  names = [r.name for r in runs]
  duplicates = sorted({n for n in names if names.count(n) > 1})
  if duplicates:
    raise ValueError(f"Sweep {sweep.name!r}: run names {duplicates} repeat; give the runs "
                     "entries distinct 'name's.")
  for run in runs:
    validate(run, sweep)
  return runs


def _base_spec(sweep: Sweep) -> str:
  return sweep.base if isinstance(sweep.base, str) else BASE_MARK


def _pair_scratch(runs: List[Run], sweep: Sweep, num_entries: int, num_combos: int) -> None:
  """Sets `baseline` of every pretrained run to its scratch run (same grid values)."""
  if not sweep.add_scratch_baseline:
    return
  for index, run in enumerate(runs[:num_entries * num_combos]):
    entry, combo = divmod(index, num_combos)
    partner_entry = entry if sweep.add_scratch_baseline is True else 0
    run.baseline = runs[(num_entries + partner_entry) * num_combos + combo].name


def resolved_config(run: Run, sweep: Sweep):
  config = (load_config(run.config) if run.config != BASE_MARK else copy.deepcopy(sweep.base))
  return apply_overrides(config, run.overrides, where=f"run {run.name!r}")


def validate(run: Run, sweep: Sweep) -> None:
  """Applies the run's overrides in-process (names and types) and makes its CLI text."""
  config = resolved_config(run, sweep)
  run.cli = {k: cli_value(config, k, v) for k, v in run.overrides.items()}
  run.final_steps = config.get("total_steps")


# ----------------------------------------------------------------------------
# Running one subprocess.


def read_json(path: Path, default=None):
  try:
    return json.loads(Path(path).read_text())
  except (OSError, ValueError):
    return default


def read_jsonl(path: Path) -> List[Dict[str, Any]]:
  """Complete lines of a JSONL file (a half-written last line is left out)."""
  try:
    text = Path(path).read_text()
  except OSError:
    return []
  rows = []
  for line in text.splitlines(keepends=True):
    if line.endswith("\n") and line.strip():
      try:
        rows.append(json.loads(line))
      except ValueError:
        pass
  return rows


def write_json(path: Path, value) -> None:
  tmp = Path(path).with_suffix(".tmp")
  tmp.write_text(json.dumps(value, indent=2, sort_keys=True, default=str) + "\n")
  tmp.replace(path)


def checkpoint_steps(workdir: Path) -> List[int]:
  folder = Path(workdir) / "checkpoints"
  if not folder.is_dir():
    return []
  return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit())


def run_state(run: Run) -> str:
  """done, pruned, failed, changed (other request), interrupted or new, from the workdir."""
  record = read_json(run.workdir / RECORD, {}) or {}
  same = not record or record.get("request") == run.request()
  summary = read_json(run.workdir / "summary.json")
  if summary is not None and same:
    if run.final_steps is None or summary.get("step") == run.final_steps:
      return "done"
  if same and record.get("status") in ("pruned", "failed"):
    return record["status"]
  if not same:
    return "changed"  # Run again with the new request; train.run resumes from what is there.
  if checkpoint_steps(run.workdir) or (run.workdir / "metrics.jsonl").exists():
    return "interrupted"
  return "new"


class Processes:
  """Live subprocesses, so that Ctrl-C can end them (they are in our process group)."""

  def __init__(self):
    self.lock, self.live, self.stopping = threading.Lock(), set(), False

  def add(self, proc):
    with self.lock:
      self.live.add(proc)

  def remove(self, proc):
    with self.lock:
      self.live.discard(proc)

  def stop_all(self):
    with self.lock:
      self.stopping = True
      procs = list(self.live)
    for proc in procs:
      stop(proc)


def stop(proc: subprocess.Popen, grace_s: float = 15.0) -> None:
  if proc.poll() is None:
    proc.terminate()
    try:
      proc.wait(grace_s)
    except subprocess.TimeoutExpired:
      proc.kill()
      proc.wait()


def execute(command: List[str], workdir: Path, *, env: Optional[Dict[str, str]] = None,
            on_eval: Optional[Callable[[Dict[str, Any]], bool]] = None,
            processes: Optional[Processes] = None, poll_s: float = 1.0) -> Tuple[str, int, float]:
  """Runs `command`, output appended to `workdir/log.txt`; returns (status, rc, seconds).

  While it runs, each new line of `workdir/metrics.jsonl` goes to `on_eval`; a True
  answer stops the process ("pruned"). status: done, failed, pruned or interrupted.
  """
  workdir.mkdir(parents=True, exist_ok=True)
  metrics = workdir / "metrics.jsonl"
  seen = len(read_jsonl(metrics))  # Lines from earlier attempts were reported then.
  t0 = time.time()
  with open(workdir / LOG_FILE, "a") as out:
    out.write(f"\n===== {datetime.datetime.now().isoformat(timespec='seconds')} "
              f"tlflax.sweep: {' '.join(command)}\n")
    out.flush()
    proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env,
                            stdin=subprocess.DEVNULL)
  if processes:
    processes.add(proc)
  pruned, wait = False, 0.05
  try:
    while proc.poll() is None:
      time.sleep(wait)
      wait = min(poll_s, 2 * wait)
      if on_eval is None:
        continue
      rows = read_jsonl(metrics)
      for row in rows[seen:]:
        if on_eval(row):
          pruned = True
      seen = len(rows)
      if pruned:
        stop(proc)
  finally:
    if processes:
      processes.remove(proc)
  if proc.poll() is None:
    stop(proc)
  rc = proc.returncode
  if pruned:
    status = "pruned"
  elif (processes is not None and processes.stopping) or rc in (-signal.SIGINT, 130):
    status = "interrupted"  # Ctrl-C reaches the subprocesses too (same process group).
  else:
    status = "done" if rc == 0 else "failed"
  return status, rc, time.time() - t0


def record_attempt(run_dir: Path, request: Dict[str, Any], status: str, rc: int, seconds: float,
                   extra: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
  record = read_json(run_dir / RECORD, {}) or {}
  if record.get("request") not in (None, request):
    record = {"previous_requests": record.get("previous_requests", []) + [record["request"]]}
  attempts = record.get("attempts", []) + [{
      "ended": datetime.datetime.now().isoformat(timespec="seconds"), "status": status,
      "rc": rc, "wall_s": round(seconds, 2)}]
  record.update(extra or {})
  record.update(request=request, status=status, attempts=attempts,
                wall_s=round(sum(a["wall_s"] for a in attempts), 2))
  write_json(run_dir / RECORD, record)
  return record


def default_launcher() -> List[str]:
  return [sys.executable, "-m", "tlflax.main"]


def command_for(run: Run, sweep_root: Path, launcher: Optional[Sequence[str]] = None) -> List[str]:
  """`launcher` (default: this Python's `-m tlflax.main`) + --config, --workdir, overrides."""
  spec = str(sweep_root / GENERATED_BASE) if run.config == BASE_MARK else run.config
  return (list(launcher or default_launcher()) + [f"--config={spec}", f"--workdir={run.workdir}"]
          + [f"--config.{k}={v}" for k, v in run.cli.items()])


def write_generated_base(sweep: Sweep, sweep_root: Path) -> None:
  """For a ConfigDict base: a config file that returns it (from the sweep file)."""
  if isinstance(sweep.base, str):
    return
  if sweep.path is None:
    raise ValueError("A sweep with a ConfigDict base must come from a sweep file "
                     "(load_sweep) so that its runs can load the base in a subprocess.")
  sweep_root.mkdir(parents=True, exist_ok=True)
  (sweep_root / GENERATED_BASE).write_text(
      f'"""Generated by tlflax.sweep: the base config of the sweep file {sweep.path}.\n\n'
      'Edit the sweep file, not this one.\n"""\n'
      "from tlflax import experiments\n\n\n"
      "def get_config(arg=None):\n"
      f"  return experiments.sweep_base_config({str(sweep.path)!r})\n")


# ----------------------------------------------------------------------------
# Grid / list sweeps.


def select(runs: List[Run], only: Optional[Sequence[str]]) -> List[Run]:
  if not only:
    return runs
  names = [r.name for r in runs]
  chosen = [r for r in runs if any(fnmatch.fnmatchcase(r.name, p) for p in only)]
  unmatched = [p for p in only if not any(fnmatch.fnmatchcase(n, p) for n in names)]
  if unmatched:
    raise ValueError(f"--only {unmatched} matches no run; runs: {', '.join(names)}.")
  return chosen


def run_sweep(sweep: Sweep, root: Union[str, Path] = "workdirs", *, parallel: int = 1,
              only: Optional[Sequence[str]] = None, dry_run: bool = False,
              env: Optional[Dict[str, str]] = None,
              launcher: Optional[Sequence[str]] = None) -> Dict[str, Any]:
  """Plans (and validates) every run, runs those not done, writes the report.

  Returns {"runs": {name: status of this invocation}, "rows": table rows, "files": ...}:
  status "skipped" for runs already done, else the attempt's status. `env`: the
  subprocesses' environment (default: this one's); `launcher`: the command before
  `--config=...` (default `python -m tlflax.main`; e.g. ["taskset", "-c", "0", ...]).
  """
  if sweep.search is not None:
    return run_search(sweep, root, parallel=parallel, dry_run=dry_run, env=env,
                      launcher=launcher)
  runs = plan(sweep, root)
  chosen = select(runs, only)
  root_dir = sweep_dir(sweep, root)
  states = {r.name: run_state(r) for r in chosen}
  todo = [r for r in chosen if states[r.name] != "done"]
  if SEED_KEY in sweep.grid:  # Seed by seed: a sweep stopped half-way has every variant.
    seeds = sweep.grid[SEED_KEY]
    todo.sort(key=lambda r: seeds.index(r.seed) if r.seed in seeds else len(seeds))
  log.info("Sweep %s: %d runs (%d selected), %d to run, in %s.", sweep.name, len(runs),
           len(chosen), len(todo), root_dir)
  for run in chosen:
    log.info("  %-40s %s", run.name, states[run.name])
  if dry_run:
    for run in todo:
      print(" ".join(_quote(a) for a in command_for(run, root_dir, launcher)))
    return {"runs": {r.name: states[r.name] for r in chosen}, "rows": [], "files": {},
            "commands": [command_for(r, root_dir, launcher) for r in todo]}
  write_generated_base(sweep, root_dir)
  results = {r.name: "skipped" for r in chosen if states[r.name] == "done"}
  processes = Processes()
  counter = itertools.count(1)

  def one(run: Run) -> None:
    if processes.stopping:
      return
    command = command_for(run, root_dir, launcher)
    status, rc, seconds = execute(command, run.workdir, env=env, processes=processes)
    record_attempt(run.workdir, run.request(), status, rc, seconds,
                   {"name": run.name, "varied": _jsonable(run.varied), "command": command})
    results[run.name] = status
    summary = read_json(run.workdir / "summary.json", {}) or {}
    metric = sweep.metric or next((m for m in MAIN_METRICS if m in summary), None)
    shown = f", {metric}={summary[metric]:.4f}" if metric and status == "done" else ""
    tail = "" if status == "done" else f" (rc {rc}; log: {run.workdir / LOG_FILE})"
    log.info("[%d/%d] %s: %s in %.0f s%s%s", next(counter), len(todo), run.name, status,
             seconds, shown, tail)

  _run_all(todo, one, parallel, processes)
  report = write_report(sweep, runs, root_dir)
  failed = [n for n, s in results.items() if s == "failed"]
  if failed:
    log.error("Sweep %s: %d run(s) failed: %s (see their log.txt).", sweep.name, len(failed),
              ", ".join(failed))
  return {"runs": results, "rows": report["rows"], "files": report["files"]}


def _run_all(items, fn, parallel: int, processes: Processes) -> None:
  """fn(item) for each item, `parallel` at a time; Ctrl-C stops the live subprocesses."""
  if parallel < 1:
    raise ValueError(f"parallel must be >= 1, got {parallel}.")
  pool = ThreadPoolExecutor(max_workers=parallel)
  futures = [pool.submit(fn, item) for item in items]
  try:
    for future in futures:
      while not future.done():
        time.sleep(0.2)
      future.result()
  except KeyboardInterrupt:
    log.warning("Interrupted: stopping the running subprocesses; the same command resumes.")
    processes.stop_all()
    raise
  finally:
    pool.shutdown(wait=True, cancel_futures=True)


def _quote(arg: str) -> str:
  if re.fullmatch(r"[A-Za-z0-9_./:=,+-]+", arg):
    return arg
  return "'" + arg.replace("'", "'\\''") + "'"


def _jsonable(value):
  return json.loads(json.dumps(value, default=str))


# ----------------------------------------------------------------------------
# Results: rows, tables, plots.


def main_metric(sweep_metric: Optional[str], summaries: Sequence[Dict[str, Any]]) -> str:
  if sweep_metric:
    return sweep_metric
  for metric in MAIN_METRICS:
    if any(metric in s for s in summaries):
      return metric
  return MAIN_METRICS[0]


def lower_is_better(metric: str) -> bool:
  return "loss" in metric


def row_for(run: Run, metric: str, scratch_column: bool = False) -> Dict[str, Any]:
  """One table row: varied fields, status, final and best metrics, wall time."""
  summary = read_json(run.workdir / "summary.json")
  record = read_json(run.workdir / RECORD, {}) or {}
  history = read_jsonl(run.workdir / "metrics.jsonl")
  status = run_state(run)
  row: Dict[str, Any] = {"run": run.name, "variant": run.variant}
  row.update({k: fmt_value(k, v) if isinstance(v, (tuple, list)) else v
              for k, v in run.varied.items()})
  if scratch_column:
    row["scratch"] = run.scratch
  row["status"] = status
  final = summary if (summary is not None and status == "done") else {}
  row[metric] = final.get(metric)
  base = metric[len("best/"):] if metric.startswith("best/") else metric
  scored = [h for h in history if base in h]
  best_key = f"best/{base}"
  if final.get(best_key) is not None:
    row[best_key], row["best/step"] = final[best_key], final.get("best/step")
  elif scored:
    pick = (min if lower_is_better(base) else max)(scored, key=lambda h: h[base])
    row[best_key], row["best/step"] = pick[base], pick["step"]
  else:
    row[best_key], row["best/step"] = None, None
  row["step"] = final.get("step", scored[-1]["step"] if scored else None)
  for key in sorted(final):
    if key.startswith("eval/") and key != metric:
      row[key] = final[key]
  row["wall_s"] = record.get("wall_s", _mtime_wall(run.workdir) if final else None)
  row["workdir"] = str(run.workdir)
  return row


def _mtime_wall(workdir: Path) -> Optional[float]:
  try:
    return round((workdir / "summary.json").stat().st_mtime -
                 (workdir / "config.json").stat().st_mtime, 1)
  except OSError:
    return None


def add_transfer_gain(rows: List[Dict[str, Any]], runs: List[Run], metric: str) -> None:
  by_name = {r["run"]: r for r in rows}
  for run in runs:
    if run.baseline is None:
      continue
    row, partner = by_name[run.name], by_name.get(run.baseline)
    value, ref = row.get(metric), (partner or {}).get(metric)
    gain = None if value is None or ref is None else value - ref
    if gain is not None and lower_is_better(metric):
      gain = -gain
    row["scratch_run"] = run.baseline
    row["transfer_gain"] = gain
    row["negative_transfer"] = None if gain is None else gain < 0


def mean_std(values: Sequence[float]) -> Tuple[Optional[float], Optional[float]]:
  values = [v for v in values if v is not None]
  if not values:
    return None, None
  mean = sum(values) / len(values)
  if len(values) < 2:
    return mean, None
  return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def aggregate(rows: List[Dict[str, Any]], runs: List[Run], metric: str) -> List[Dict[str, Any]]:
  """Per variant over seeds: mean and sample std (n-1) of final/best metric and gain."""
  by_variant: Dict[str, List[Dict[str, Any]]] = {}
  for run, row in zip(runs, rows):
    by_variant.setdefault(run.variant, []).append(row)
  out = []
  best_key = f"best/{metric[len('best/'):] if metric.startswith('best/') else metric}"
  for variant, group in by_variant.items():
    done = [r for r in group if r["status"] == "done"]
    entry = {"variant": variant, "runs": len(group), "done": len(done),
             "seeds": ",".join(str(r.get(SEED_KEY)) for r in done)}
    for key in (metric, best_key, "transfer_gain", "wall_s"):
      if key == "transfer_gain" and not any("transfer_gain" in r for r in group):
        continue
      entry[f"{key} mean"], entry[f"{key} std"] = mean_std([r.get(key) for r in done])
    if "transfer_gain mean" in entry:
      mean, std = entry["transfer_gain mean"], entry["transfer_gain std"]
      entry["negative_transfer"] = (None if mean is None else
                                    "yes" if mean < 0 and (std is None or mean + std < 0) else
                                    "within noise" if mean < 0 else "no")
    out.append(entry)
  return out


def write_csv(path: Path, rows: List[Dict[str, Any]]) -> None:
  columns = list(dict.fromkeys(k for r in rows for k in r))
  with open(path, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=columns)
    writer.writeheader()
    for row in rows:
      writer.writerow({k: "" if row.get(k) is None else row[k] for k in columns})


def _cell(value, signed: bool = False) -> str:
  if value is None:
    return "-"
  if isinstance(value, bool):
    return "yes" if value else "no"
  if isinstance(value, float):
    return f"{value:+.4f}" if signed else (f"{value:.4g}" if abs(value) >= 100 else f"{value:.4f}")
  return str(value).replace("|", "\\|")


def markdown_table(rows: List[Dict[str, Any]], columns: List[str]) -> str:
  lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
  for row in rows:
    lines.append("| " + " | ".join(
        f"{row[c]:.0f}" if c == "wall_s" and isinstance(row.get(c), float) else
        _cell(row.get(c), signed=c.startswith("transfer_gain")) for c in columns) + " |")
  return "\n".join(lines)


def _pm(mean, std, signed=False) -> str:
  if mean is None:
    return "-"
  text = _cell(mean, signed)
  return text if std is None else f"{text} ± {std:.4f}"


def write_report(sweep: Sweep, runs: List[Run], root_dir: Path,
                 notes: Sequence[str] = ()) -> Dict[str, Any]:
  """results.csv / results.md (+ results_by_variant.csv with seeds) and PNG plots."""
  root_dir.mkdir(parents=True, exist_ok=True)
  summaries = [read_json(r.workdir / "summary.json", {}) or {} for r in runs]
  metric = main_metric(sweep.metric, summaries)
  scratch_column = any(r.scratch for r in runs)
  rows = [row_for(run, metric, scratch_column) for run in runs]
  add_transfer_gain(rows, runs, metric)
  files = {"csv": root_dir / "results.csv", "md": root_dir / "results.md"}
  write_csv(files["csv"], rows)
  axes = list(dict.fromkeys(k for r in runs for k in r.varied))
  best_key = f"best/{metric[len('best/'):] if metric.startswith('best/') else metric}"
  columns = (["run"] + axes + (["scratch"] if scratch_column else [])
             + ["status", metric, best_key, "best/step"]
             + (["eval/loss"] if metric != "eval/loss" else [])
             + (["transfer_gain", "negative_transfer"] if any("transfer_gain" in r for r in rows)
                else []) + ["wall_s"])
  md = [f"# Sweep `{sweep.name}`", ""]
  if sweep.path:
    md += [f"Sweep file: `{sweep.path}`. Metric: `{metric}` of the final eval "
           f"(`summary.json`); best = best eval so far, with its step.", ""]
  for note in notes:
    md += [note, ""]
  seeded = any(SEED_KEY in r.varied for r in runs)
  if seeded:
    agg = aggregate(rows, runs, metric)
    files["by_variant_csv"] = root_dir / "results_by_variant.csv"
    write_csv(files["by_variant_csv"], agg)
    md += ["## Mean ± std over seeds (sample std, n-1)", ""]
    agg_rows = []
    for a in agg:
      shown = {"variant": a["variant"], "done": f"{a['done']}/{a['runs']}",
               metric: _pm(a.get(f"{metric} mean"), a.get(f"{metric} std")),
               best_key: _pm(a.get(f"{best_key} mean"), a.get(f"{best_key} std")),
               "wall_s": (f"{a['wall_s mean']:.0f}" if a.get("wall_s mean") is not None
                          else "-")}
      if "transfer_gain mean" in a:
        shown["transfer_gain"] = _pm(a["transfer_gain mean"], a["transfer_gain std"], True)
        shown["negative_transfer"] = a["negative_transfer"]
      agg_rows.append(shown)
    agg_cols = ["variant", "done", metric, best_key] + (
        ["transfer_gain", "negative_transfer"] if any("transfer_gain" in a for a in agg_rows)
        else []) + ["wall_s"]
    md += [markdown_table(agg_rows, agg_cols), ""]
  if any("transfer_gain" in r for r in rows):
    md += ["`transfer_gain` = metric minus the metric of the same run with "
           "`model.pretrained=False` (same grid values and seed); negative = negative "
           "transfer.", ""]
  md += ["## Runs", "", markdown_table(rows, columns), ""]
  pruned = [r["run"] for r in rows if r["status"] == "pruned"]
  if pruned:
    md += ["Pruned (stopped early by the search's pruner): " + ", ".join(pruned) + ".", ""]
  not_done = [r for r in rows if r["status"] not in ("done", "pruned")]
  if not_done:
    md += ["Not finished: " + ", ".join(f"`{r['run']}` ({r['status']}, log: "
                                        f"`{Path(r['workdir']) / LOG_FILE}`)" for r in not_done),
           ""]
  try:
    files.update(plot(runs, rows, metric, root_dir))
  except Exception as e:  # pylint: disable=broad-except
    log.warning("Plots not written: %s: %s", type(e).__name__, e)
  for key in ("metric_png", "curves_png"):
    if key in files:
      md += [f"![{key}]({files[key].name})", ""]
  files["md"].write_text("\n".join(md))
  log.info("Results: %s", files["md"])
  return {"rows": rows, "files": files, "metric": metric}


def train_curve(workdir: Path, tag: str = "train/loss") -> List[Tuple[int, float]]:
  """(step, value) of a training scalar from the run's TensorBoard files (best effort)."""
  files = sorted(Path(workdir).glob("events.out.tfevents.*"))
  if not files:
    return []
  # pylint: disable-next=g-import-not-at-top
  from tensorboard.backend.event_processing import event_file_loader
  from tensorboard.util import tensor_util  # pylint: disable=g-import-not-at-top
  points: Dict[int, float] = {}
  for path in files:
    for event in event_file_loader.EventFileLoader(str(path)).Load():
      for value in event.summary.value:
        if value.tag == tag:
          kind = value.WhichOneof("value")
          number = (float(tensor_util.make_ndarray(value.tensor)) if kind == "tensor"
                    else float(value.simple_value))
          points[int(event.step)] = number
  return sorted(points.items())


def plot(runs: List[Run], rows: List[Dict[str, Any]], metric: str,
         root_dir: Path) -> Dict[str, Path]:
  """metric_by_variant.png (mean, seed points, std bars) and curves.png (per step)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  files = {}
  variants = list(dict.fromkeys(r.variant for r in runs))
  scratch_variants = {r.variant for r in runs if r.scratch}
  colors = {v: plt.get_cmap("tab10")(i % 10)
            for i, v in enumerate(v for v in variants if v not in scratch_variants)}
  variant_of = {r.name: r.variant for r in runs}
  for v in scratch_variants:  # A per-variant scratch run takes its partner's colour.
    partners = {r.variant for r in runs if r.baseline and variant_of.get(r.baseline) == v}
    colors[v] = colors[partners.pop()] if len(partners) == 1 else (0.45, 0.45, 0.45, 1.0)
  values = {v: [row[metric] for run, row in zip(runs, rows)
                if run.variant == v and row.get(metric) is not None] for v in variants}
  if any(values.values()):
    fig, ax = plt.subplots(figsize=(max(4.0, 1.1 * len(variants) + 2), 4))
    for i, v in enumerate(variants):
      if not values[v]:
        continue
      mean, std = mean_std(values[v])
      ax.bar(i, mean, color=colors[v], alpha=0.35 if v in scratch_variants else 0.6,
             hatch="//" if v in scratch_variants else None, edgecolor=colors[v])
      if std is not None:
        ax.errorbar(i, mean, yerr=std, color="black", capsize=4)
      jitter = [(k - (len(values[v]) - 1) / 2) * 0.08 for k in range(len(values[v]))]
      ax.scatter([i + j for j in jitter], values[v], color="black", s=14, zorder=3)
    ax.set_xticks(range(len(variants)))
    ax.set_xticklabels(variants, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(f"final {metric}")
    flat = [x for vals in values.values() for x in vals]
    low, high = min(flat), max(flat)
    pad = max(0.02, 0.15 * (high - low))
    ax.set_ylim(max(0.0, low - pad) if low >= 0 else low - pad, high + pad)
    ax.set_title("final metric per variant (bar: mean, dots: seeds, line: ±1 std)", fontsize=9)
    fig.tight_layout()
    files["metric_png"] = root_dir / "metric_by_variant.png"
    fig.savefig(files["metric_png"], dpi=110)
    plt.close(fig)
  base = metric[len("best/"):] if metric.startswith("best/") else metric
  panels = [(base, "eval"), ("eval/loss", "eval")] if base != "eval/loss" else [(base, "eval")]
  curves = {run.name: read_jsonl(run.workdir / "metrics.jsonl") for run in runs}
  train = {}
  try:
    train = {run.name: train_curve(run.workdir) for run in runs}
  except Exception as e:  # pylint: disable=broad-except
    log.warning("Training curves not read from TensorBoard files: %s", e)
  if any(train.values()):
    panels.append(("train/loss", "train"))
  if any(curves.values()):
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.8), squeeze=False)
    for ax, (key, source) in zip(axes[0], panels):
      labelled = set()
      for run in runs:
        if source == "eval":
          points = [(h["step"], h[key]) for h in curves[run.name] if key in h]
        else:
          points = train.get(run.name, [])
        if not points:
          continue
        points = sorted(dict(points).items())
        label = run.variant if run.variant not in labelled else None
        labelled.add(run.variant)
        ax.plot([p[0] for p in points], [p[1] for p in points], color=colors[run.variant],
                alpha=0.8, lw=1.2, ls="--" if run.scratch else "-", label=label,
                marker="o" if len(points) < 3 else None, ms=3)
      ax.set_xlabel("step")
      ax.set_ylabel(key)
      ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    files["curves_png"] = root_dir / "curves.png"
    fig.savefig(files["curves_png"], dpi=110)
    plt.close(fig)
  return files


def report_only(sweep: Sweep, root: Union[str, Path] = "workdirs") -> Dict[str, Any]:
  """Rebuilds tables and plots from the workdirs, running nothing."""
  if sweep.search is not None:
    return search_report(sweep, root)
  runs = plan(sweep, root)
  return write_report(sweep, runs, sweep_dir(sweep, root))


# ----------------------------------------------------------------------------
# Selection split for searches: carved from train by data config fields.


def tfds_names() -> Tuple[str, ...]:
  from tlflax.data import segmentation, tfds_datasets  # pylint: disable=g-import-not-at-top
  return tuple(tfds_datasets.TFDS_NAMES) + tuple(segmentation.TFDS_SEGMENTATION)


def _split_counts(n: int, fraction: float) -> int:
  return min(n - 1, max(1, round(n * fraction))) if n >= 2 else 0


def holdout_overrides(config, fraction: float, seed: int, out_dir: Path,
                      create: bool = True) -> Tuple[Optional[Dict[str, Any]], str]:
  """Data overrides that train on train minus a held-out part and evaluate on that part.

  Done with the data config fields alone: `folder` and `mask_folder` get a new root of
  symbolic links (stratified by class for `folder`), TFDS datasets get split slices
  ("train[:80%]" / "train[80%:]"), every other dataset `data.holdout_fraction`
  (`tlflax.data.holdout`). Returns (None, reason) only for configs without that field.
  """
  data = config.data
  if not 0 < fraction < 1:
    raise ValueError(f"holdout_fraction must be in (0, 1), got {fraction}.")
  if data.name in ("folder", "mask_folder"):
    root = Path(data.root or "").expanduser().resolve()
    if not data.root or not root.is_dir():
      raise FileNotFoundError(f"data.root {data.root!r} is not a folder (from {os.getcwd()}).")
    target = out_dir / "holdout_data"
    make = _holdout_folder if data.name == "folder" else _holdout_mask_folder
    description = make(data, root, fraction, seed, target, create)
    return ({"data.root": str(target), "data.train_split": "fit",
             "data.eval_split": "holdout"}, description)
  if data.name in tfds_names():
    split = data.train_split
    if "[" in split:
      return None, f"train_split {split!r} is already a slice; set the holdout by hand."
    keep = round(100 * (1 - fraction))
    return ({"data.train_split": f"{split}[:{keep}%]", "data.eval_split": f"{split}[{keep}%:]"},
            f"TFDS split slices {split}[:{keep}%] (fit) / {split}[{keep}%:] (holdout)")
  if "holdout_fraction" in data:  # Any other dataset with random access (digits, VOC, COCO).
    return ({"data.holdout_fraction": fraction, "data.holdout_seed": seed},
            f"data.holdout_fraction={fraction} (seed {seed}): eval on that part of "
            f"{data.name}'s train split")
  return None, (f"dataset {data.name!r} cannot be split by config fields (its train/eval "
                "split is fixed in the builder)")


def _holdout_folder(data, root: Path, fraction: float, seed: int, target: Path,
                    create: bool) -> str:
  train = root / data.train_split
  extensions = {"." + e.lower().lstrip(".") for e in data.extensions}
  classes = sorted(p.name for p in train.iterdir() if p.is_dir() and not p.name.startswith("."))
  rng = random.Random(seed)
  manifest = {"source": str(train), "fraction": fraction, "seed": seed, "fit": {}, "holdout": {}}
  for name in classes:
    files = sorted(p.name for p in (train / name).iterdir()
                   if p.is_file() and p.suffix.lower() in extensions)
    rng.shuffle(files)
    k = _split_counts(len(files), fraction)
    manifest["holdout"][name], manifest["fit"][name] = sorted(files[:k]), sorted(files[k:])
  if create:
    _link_tree(target, manifest, lambda split, name, f: train / name / f,
               lambda split, name, f: target / split / name / f)
  counts = {s: sum(len(v) for v in manifest[s].values()) for s in ("fit", "holdout")}
  return (f"folder {train}: stratified {counts['fit']} fit / {counts['holdout']} holdout "
          f"images (seed {seed}), linked under {target}")


def _holdout_mask_folder(data, root: Path, fraction: float, seed: int, target: Path,
                         create: bool) -> str:
  split_file = root / "splits" / f"{data.train_split}.txt"
  stems = [s.strip() for s in split_file.read_text().splitlines() if s.strip()]
  rng = random.Random(seed)
  shuffled = stems[:]
  rng.shuffle(shuffled)
  k = _split_counts(len(stems), fraction)
  manifest = {"source": str(split_file), "fraction": fraction, "seed": seed,
              "fit": sorted(shuffled[k:]), "holdout": sorted(shuffled[:k])}
  if create:
    if read_json(target / "manifest.json") != manifest:
      _reset(target)
      (target / "splits").mkdir(parents=True)
      for folder in ("images", data.masks_dir):
        (target / folder).symlink_to(root / folder, target_is_directory=True)
      for split in ("fit", "holdout"):
        (target / "splits" / f"{split}.txt").write_text("\n".join(manifest[split]) + "\n")
      write_json(target / "manifest.json", manifest)
  return (f"mask_folder {split_file}: {len(stems) - k} fit / {k} holdout stems (seed {seed}), "
          f"under {target}")


def _reset(target: Path) -> None:
  import shutil  # pylint: disable=g-import-not-at-top
  if target.is_symlink() or target.is_file():
    target.unlink()
  elif target.exists():
    shutil.rmtree(target)


def _link_tree(target: Path, manifest, source_of, link_of) -> None:
  if read_json(target / "manifest.json") == manifest:
    return
  _reset(target)
  for split in ("fit", "holdout"):
    for name, files in manifest[split].items():
      (target / split / name).mkdir(parents=True, exist_ok=True)
      for f in files:
        link_of(split, name, f).symlink_to(source_of(split, name, f))
  write_json(target / "manifest.json", manifest)


# ----------------------------------------------------------------------------
# Hyperparameter search (optuna: grid, random, TPE; pruning on metrics.jsonl).


def _primitive(value) -> bool:
  return value is None or isinstance(value, (bool, int, float, str))


@dataclasses.dataclass
class Axis:
  name: str
  kind: str
  low: Any = None
  high: Any = None
  choices: Optional[List[Any]] = None

  def suggest(self, trial):
    if self.kind in ("uniform", "log_uniform"):
      return trial.suggest_float(self.name, self.low, self.high, log=self.kind == "log_uniform")
    if self.kind in ("int", "log_int"):
      return trial.suggest_int(self.name, self.low, self.high, log=self.kind == "log_int")
    keys = [c if _primitive(c) else repr(c) for c in self.choices]
    picked = trial.suggest_categorical(self.name, keys)
    return self.choices[keys.index(picked)]

  def decode(self, stored):
    """An optuna-stored param value back to the config value."""
    if self.kind != "choice":
      return stored
    keys = [c if _primitive(c) else repr(c) for c in self.choices]
    return self.choices[keys.index(stored)] if stored in keys else stored

  def grid(self, points: int) -> List[Any]:
    import numpy as np  # pylint: disable=g-import-not-at-top
    if self.kind == "choice":
      return [c if _primitive(c) else repr(c) for c in self.choices]
    if self.kind in ("uniform", "int"):
      values = np.linspace(self.low, self.high, points)
    else:
      values = np.geomspace(self.low, self.high, points)
    if self.kind in ("int", "log_int"):
      return sorted({int(round(v)) for v in values})
    return [float(v) for v in values]


def parse_space(space: Dict[str, Any]) -> List[Axis]:
  axes = []
  for name, spec in space.items():
    if not isinstance(spec, (tuple, list)) or not spec:
      raise ValueError(f"search space {name!r}: give (kind, ...), e.g. ('log_uniform', 1e-4, "
                       "1e-1) or ('choice', [a, b]).")
    kind = spec[0]
    if kind in ("uniform", "log_uniform", "int", "log_int"):
      if len(spec) != 3 or not spec[1] < spec[2]:
        raise ValueError(f"search space {name!r}: ({kind!r}, low, high) with low < high.")
      if kind.startswith("log") and spec[1] <= 0:
        raise ValueError(f"search space {name!r}: {kind} needs low > 0.")
      axes.append(Axis(name, kind, spec[1], spec[2]))
    elif kind == "choice":
      if len(spec) != 2 or not list(spec[1]):
        raise ValueError(f"search space {name!r}: ('choice', [values]).")
      axes.append(Axis(name, kind, choices=list(spec[1])))
    else:
      raise ValueError(f"search space {name!r}: unknown kind {kind!r}; use uniform, "
                       "log_uniform, int, log_int or choice.")
  return axes


@dataclasses.dataclass
class SearchSetup:
  sweep: Sweep
  root_dir: Path
  axes: List[Axis]
  method: str
  num_trials: int
  metric: str
  direction: str
  fixed: Dict[str, Any]  # Sweep overrides + selection-split overrides.
  selection: str  # "holdout: ..." or "val".
  selection_note: str
  base_spec: str


def _search_options(sweep: Sweep) -> Dict[str, Any]:
  s = dict(sweep.search)
  s.setdefault("method", "tpe")
  if s["method"] not in ("grid", "random", "tpe"):
    raise ValueError(f"search method {s['method']!r}: use grid, random or tpe.")
  s.setdefault("selection", "auto")
  if s["selection"] not in ("auto", "holdout", "val"):
    raise ValueError(f"search selection {s['selection']!r}: use auto, holdout or val.")
  s.setdefault("holdout_fraction", 0.2)
  s.setdefault("grid_points", 3)
  s.setdefault("seed", 0)
  s.setdefault("start", [])
  s.setdefault("pruner", "median" if s["method"] == "tpe" else None)
  s.setdefault("final_run", True)
  return s


def setup_search(sweep: Sweep, root: Union[str, Path], create: bool = True) -> SearchSetup:
  """Validates the space against the config and decides the selection split."""
  s = _search_options(sweep)
  root_dir = sweep_dir(sweep, root)
  axes = parse_space(s["space"])
  base_spec = _base_spec(sweep)
  config_axes = [a for a in axes if a.name == CONFIG_KEY]
  specs = config_axes[0].choices if config_axes else [base_spec]
  for spec in specs:
    config = load_config(spec) if spec != BASE_MARK else copy.deepcopy(sweep.base)
    apply_overrides(config, sweep.overrides, where="overrides")
    for axis in axes:
      if axis.name == CONFIG_KEY:
        continue
      samples = axis.choices if axis.kind == "choice" else [axis.low, axis.high]
      for value in samples:
        probe = apply_overrides(copy.deepcopy(config), {axis.name: value}, "search space")
        cli_value(probe, axis.name, value)
  config = load_config(specs[0]) if specs[0] != BASE_MARK else copy.deepcopy(sweep.base)
  apply_overrides(config, sweep.overrides, where="overrides")
  task_metric = {"segmentation": "eval/mIoU", "detection": "eval/AP"}.get(
      config.get("task", "classification"), "eval/accuracy")
  metric = s.get("metric") or sweep.metric or task_metric
  direction = s.get("direction") or ("minimize" if lower_is_better(metric) else "maximize")
  selection_overrides, note = None, "selection on val requested (search.selection='val')"
  if s["selection"] != "val":
    selection_overrides, note = holdout_overrides(config, s["holdout_fraction"], s["seed"],
                                                  root_dir, create=create)
    if selection_overrides is None and s["selection"] == "holdout":
      raise ValueError(f"search.selection='holdout' but {note}.")
  fixed = dict(sweep.overrides)
  fixed.update(selection_overrides or {})
  if selection_overrides is None:
    selection = "val"
    log.warning("\n" + "!" * 78 + "\n!! WARNING: the search selects on the VAL split: %s.\n!! "
                "The best value is optimistically biased; val is no longer an honest score."
                "\n" + "!" * 78, note)
  else:
    selection = f"holdout ({note})"
  if s["method"] == "grid":
    size = math.prod(len(a.grid(s["grid_points"])) for a in axes)
    num_trials = s.get("num_trials") or size
  else:
    if not s.get("num_trials"):
      raise ValueError(f"search method {s['method']!r} needs num_trials.")
    num_trials = s["num_trials"]
  return SearchSetup(sweep, root_dir, axes, s["method"], int(num_trials), metric, direction,
                     fixed, selection, note, base_spec)


def make_study(setup: SearchSetup, resume_only: bool = False):
  """The optuna study in ROOT/<sweep>/optuna.journal (created, with `start` enqueued)."""
  import optuna  # pylint: disable=g-import-not-at-top
  s = _search_options(setup.sweep)
  optuna.logging.set_verbosity(optuna.logging.WARNING)
  if setup.method == "grid":
    sampler = optuna.samplers.GridSampler(
        {a.name: a.grid(s["grid_points"]) for a in setup.axes}, seed=s["seed"])
  elif setup.method == "random":
    sampler = optuna.samplers.RandomSampler(seed=s["seed"])
  else:
    startup = s.get("n_startup_trials")
    if startup is None:
      startup = max(2, min(10, setup.num_trials // 3))
    sampler = optuna.samplers.TPESampler(seed=s["seed"], n_startup_trials=startup)
  pruner = s["pruner"]
  if pruner is None or pruner == "none":
    pruner = optuna.pruners.NopPruner()
  elif pruner == "median":
    pruner = optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0)
  elif isinstance(pruner, str):
    raise ValueError(f"search pruner {pruner!r}: use 'median', None or an optuna pruner.")
  journal = setup.root_dir / "optuna.journal"
  if resume_only and not journal.exists():
    raise FileNotFoundError(f"No search journal {journal}: the search has not run yet.")
  setup.root_dir.mkdir(parents=True, exist_ok=True)
  storage = optuna.storages.JournalStorage(
      optuna.storages.journal.JournalFileBackend(str(journal)))
  study = optuna.create_study(study_name=setup.sweep.name, storage=storage, sampler=sampler,
                              pruner=pruner, direction=setup.direction, load_if_exists=True)
  if not study.trials:
    for point in s["start"]:
      study.enqueue_trial({k: (v if _primitive(v) else repr(v)) for k, v in point.items()})
  return study


def trial_run(setup: SearchSetup, number: int, params: Dict[str, Any]) -> Run:
  name = f"trial_{number:04d}"
  overrides = dict(setup.fixed)
  overrides.update({k: v for k, v in params.items() if k != CONFIG_KEY})
  run = Run(name=name, config=params.get(CONFIG_KEY, setup.base_spec), overrides=overrides,
            varied={k: (fmt_value(k, v) if k == CONFIG_KEY else v) for k, v in params.items()},
            variant=name, workdir=setup.root_dir / name)
  validate(run, setup.sweep)
  return run


def run_search(sweep: Sweep, root: Union[str, Path] = "workdirs", *, parallel: int = 1,
               dry_run: bool = False, env: Optional[Dict[str, str]] = None,
               launcher: Optional[Sequence[str]] = None) -> Dict[str, Any]:
  """Runs (or resumes) the search, writes results, `best_config.py` and the final run."""
  setup = setup_search(sweep, root, create=not dry_run)
  log.info("Search %s: %s, %d trials on %s (%s), selection split: %s.", sweep.name,
           setup.method, setup.num_trials, setup.metric, setup.direction, setup.selection)
  if dry_run:
    print(f"search {sweep.name}: method={setup.method} trials={setup.num_trials} "
          f"metric={setup.metric} ({setup.direction}); space: "
          + ", ".join(f"{a.name}={a.kind}" for a in setup.axes))
    print(f"selection split: {setup.selection}; every trial adds: "
          + " ".join(f"--config.{k}={v}" for k, v in setup.fixed.items()))
    return {"runs": {}, "rows": [], "files": {}, "setup": setup}
  import optuna  # pylint: disable=g-import-not-at-top
  write_generated_base(sweep, setup.root_dir)
  study = make_study(setup)
  lock, processes = threading.Lock(), Processes()
  results: Dict[str, str] = {}
  stale = [t for t in study.trials if t.state == optuna.trial.TrialState.RUNNING]
  started = [sum(t.state != optuna.trial.TrialState.WAITING for t in study.trials)]
  if stale:
    log.info("Resuming %d trial(s) left running by an earlier invocation.", len(stale))

  def run_trial(trial) -> None:
    params = {a.name: a.decode(trial.params[a.name]) if a.name in trial.params
              else a.suggest(trial) for a in setup.axes}
    run = trial_run(setup, trial.number, params)
    base = setup.metric[len("best/"):] if setup.metric.startswith("best/") else setup.metric

    def on_eval(row):
      if base not in row:
        return False
      with lock:
        trial.report(float(row[base]), int(row["step"]))
        # Never at the final eval: the run is about to finish anyway.
        return row["step"] != run.final_steps and trial.should_prune()

    status, rc, seconds = execute(command_for(run, setup.root_dir, launcher), run.workdir,
                                  env=env, on_eval=on_eval, processes=processes)
    summary = read_json(run.workdir / "summary.json", {}) or {}
    if status == "pruned" and setup.metric in summary and summary.get("step") in (
        None, run.final_steps or summary.get("step")):
      status = "done"  # Pruned at its last eval, but it had already finished.
    value = summary.get(setup.metric) if status == "done" else None
    if status == "done" and value is None:
      status = "failed"
      log.error("%s: summary.json has no %r (keys: %s).", run.name, setup.metric, sorted(summary))
    record_attempt(run.workdir, run.request(), status, rc, seconds,
                   {"name": run.name, "trial": trial.number, "varied": _jsonable(run.varied)})
    with lock:
      if status == "done":
        study.tell(trial.number, float(value))
      elif status == "pruned":
        study.tell(trial.number, state=optuna.trial.TrialState.PRUNED)
      elif status == "failed":
        study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
      results[run.name] = status  # "interrupted" stays RUNNING: resumed next time.
    shown = f" {setup.metric}={value:.4f}" if value is not None else ""
    log.info("%s %s: %s in %.0f s%s%s", run.name,
             ", ".join(f"{k}={_cell(v)}" for k, v in run.varied.items()), status, seconds, shown,
             "" if status in ("done", "pruned") else f" (log: {run.workdir / LOG_FILE})")

  def worker(item) -> None:
    if item is not None:
      run_trial(optuna.trial.Trial(study, item._trial_id))  # pylint: disable=protected-access
      return
    while not processes.stopping:
      with lock:
        if started[0] >= setup.num_trials:
          return
        started[0] += 1
        trial = study.ask()
      run_trial(trial)

  _run_all(stale + [None] * parallel, worker, parallel, processes)
  return search_report(sweep, root, setup=setup, study=study, results=results, env=env,
                       launcher=launcher)


def search_report(sweep: Sweep, root: Union[str, Path], *, setup: Optional[SearchSetup] = None,
                  study=None, results=None, env=None, launcher=None) -> Dict[str, Any]:
  """Tables and plots of the trials; best_config.py; with final_run, the best on val."""
  import optuna  # pylint: disable=g-import-not-at-top
  setup = setup or setup_search(sweep, root, create=False)
  study = study or make_study(setup, resume_only=True)
  s = _search_options(sweep)
  trials = [t for t in study.trials if t.state != optuna.trial.TrialState.WAITING]
  runs = []
  for t in trials:
    params = {a.name: a.decode(t.params[a.name]) for a in setup.axes if a.name in t.params}
    runs.append(trial_run(setup, t.number, params))
  complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
  notes = [f"Search: {setup.method}, {len(trials)}/{setup.num_trials} trials "
           f"({len(complete)} complete), on `{setup.metric}` ({setup.direction}).",
           f"Selection split: {setup.selection}."]
  if setup.selection == "val":
    notes = ["> **WARNING: trials were selected on the VAL split** "
             f"({setup.selection_note}). The best value is optimistically biased and val is "
             "no longer an honest final score. Carving a holdout from train for this dataset "
             "needs a data-layer change (see README `experiments/`)."] + notes
  best = None
  if complete:
    best = study.best_trial
    best_params = {a.name: a.decode(best.params[a.name]) for a in setup.axes
                   if a.name in best.params}
    path = write_best_config(setup, best, best_params)
    notes.append(f"Best: `trial_{best.number:04d}` {setup.metric} = {best.value:.4f} with "
                 + ", ".join(f"`{k}={_cell(v)}`" for k, v in best_params.items())
                 + f"; runnable config: `{path}`.")
  final_row = None
  if best is not None and s["final_run"] and setup.selection != "val" and results is not None:
    final_row = final_run(setup, env, launcher)
  elif best is not None and s["final_run"] and setup.selection != "val":
    final_row = read_json(setup.root_dir / "best" / "summary.json")
    final_row = final_row if final_row is None else {setup.metric: final_row.get(setup.metric)}
  if final_row is not None and final_row.get(setup.metric) is not None:
    notes.append(f"Best config retrained on the full train split, scored on val "
                 f"(`{setup.root_dir / 'best'}`): {setup.metric} = "
                 f"{final_row[setup.metric]:.4f}.")
  report = write_report(Sweep(name=sweep.name, base=sweep.base, metric=setup.metric,
                              path=sweep.path), runs, setup.root_dir, notes=notes)
  for row, t in zip(report["rows"], trials):
    row["optuna_state"] = t.state.name
  write_csv(report["files"]["csv"], report["rows"])
  try:
    report["files"].update(plot_search(setup, trials))
  except Exception as e:  # pylint: disable=broad-except
    log.warning("Search plot not written: %s: %s", type(e).__name__, e)
  if "search_png" in report["files"]:
    with open(report["files"]["md"], "a") as f:
      f.write(f"![search]({report['files']['search_png'].name})\n")
  report.update(runs=results or {}, setup=setup, study=study, best=best, final=final_row)
  return report


def write_best_config(setup: SearchSetup, best, params: Dict[str, Any]) -> Path:
  """best_config.py: get_config() = the base config + the sweep's and the best overrides.

  Without the selection-split overrides: it trains on the whole train split and
  evaluates on val.
  """
  overrides = dict(setup.sweep.overrides)
  overrides.update({k: v for k, v in params.items() if k != CONFIG_KEY})
  spec = params.get(CONFIG_KEY, setup.base_spec)
  if spec == BASE_MARK:
    base_line = f"experiments.sweep_base_config({str(setup.sweep.path)!r})"
  else:
    base_line = f"load_config_file({spec!r})"
  path = setup.root_dir / "best_config.py"
  warning = ("\nWARNING: selected on the VAL split (no holdout could be carved); its val score "
             "is optimistically biased.\n" if setup.selection == "val" else "")
  lines = [
      f'"""Best trial of search {setup.sweep.name!r}: trial_{best.number:04d}, '
      f"{setup.metric} = {best.value:.6g} on the selection split.",
      "", f"Selection split: {setup.selection}.{warning}", "",
      "Run from the directory the sweep ran in (relative paths such as data.root):",
      f"  python -m tlflax.main --config {path} --workdir workdirs/{setup.sweep.name}_best",
      '"""', "from tlflax import experiments",
      "from tlflax.config import load_config_file  # noqa: F401", "",
      f"OVERRIDES = {overrides!r}", "", "",
      "def get_config(arg=None):", "  del arg",
      f"  return experiments.apply_overrides({base_line}, OVERRIDES)", ""]
  path.write_text("\n".join(lines))
  return path


def final_run(setup: SearchSetup, env, launcher=None) -> Optional[Dict[str, Any]]:
  """Trains best_config.py on the full train split and scores it on val."""
  workdir = setup.root_dir / "best"
  request = {"config": "best_config.py",
             "overrides": {"best_config": (setup.root_dir / "best_config.py").read_text()}}
  record = read_json(workdir / RECORD, {}) or {}
  summary = read_json(workdir / "summary.json")
  if summary is not None and record.get("request") == request:
    return summary
  command = list(launcher or default_launcher()) + [
      f"--config={setup.root_dir / 'best_config.py'}", f"--workdir={workdir}"]
  log.info("Final run of the best config on the full train split, scored on val: %s", workdir)
  status, rc, seconds = execute(command, workdir, env=env)
  record_attempt(workdir, request, status, rc, seconds, {"name": "best"})
  if status != "done":
    log.error("Final run %s (rc %d); log: %s", status, rc, workdir / LOG_FILE)
    return None
  return read_json(workdir / "summary.json")


def plot_search(setup: SearchSetup, trials) -> Dict[str, Path]:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  import optuna  # pylint: disable=g-import-not-at-top
  done = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
  pruned = [t for t in trials
            if t.state == optuna.trial.TrialState.PRUNED and t.intermediate_values]
  if not done:
    return {}
  numeric = [a for a in setup.axes if a.kind != "choice"]
  fig, axes = plt.subplots(1, 1 + len(numeric), figsize=(4.5 * (1 + len(numeric)), 3.6),
                           squeeze=False)
  ax = axes[0][0]
  ax.scatter([t.number for t in done], [t.value for t in done], s=16, color="C0", label="final")
  last = lambda t: t.intermediate_values[max(t.intermediate_values)]
  if pruned:
    ax.scatter([t.number for t in pruned], [last(t) for t in pruned], s=20, marker="x",
               color="grey", label="pruned (last eval)")
  pick = max if setup.direction == "maximize" else min
  best_so_far, current = [], None
  for t in done:
    current = t.value if current is None else pick(current, t.value)
    best_so_far.append(current)
  ax.step([t.number for t in done], best_so_far, where="post", color="C1", label="best so far")
  ax.set_xlabel("trial")
  ax.set_ylabel(setup.metric)
  ax.legend(fontsize=7)
  for ax, axis in zip(axes[0][1:], numeric):
    points = [(t.params[axis.name], t.value) for t in done if axis.name in t.params]
    ax.scatter([p[0] for p in points], [p[1] for p in points], s=16, color="C0")
    points = [(t.params[axis.name], last(t)) for t in pruned if axis.name in t.params]
    ax.scatter([p[0] for p in points], [p[1] for p in points], s=20, marker="x", color="grey")
    if axis.kind.startswith("log"):
      ax.set_xscale("log")
    ax.set_xlabel(axis.name)
  fig.tight_layout()
  path = setup.root_dir / "search.png"
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return {"search_png": path}
