"""The command line of `python -m tlflax.reproduce` (see the package docstring).

Exit status: 0 when every selected entry finished within its bands, 1 when a figure is
outside its band or a run failed, 2 on a usage error (unknown name, dirty tree, ...).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from tlflax import reporting
from tlflax.reproduce import bands, entries as entries_lib, provenance, readme, runner

REPO = Path(__file__).resolve().parents[2]


def parse_args(argv):
  p = argparse.ArgumentParser(prog="python -m tlflax.reproduce",
                              description="Re-make the reported figures and check them.")
  p.add_argument("names", nargs="*", help="entries to run (default: every full entry)")
  p.add_argument("--quick", action="store_true", help="the quick (CI) set")
  p.add_argument("--list", action="store_true", help="list the entries and exit")
  p.add_argument("--workroot", default=None,
                 help="workdirs go to WORKROOT/<name> (default: workdirs/reproduce in the "
                      "repository)")
  p.add_argument("--seeds", default="",
                 help="comma-separated seeds: one run per seed, figures = their mean, and "
                      "--accept sets bands from their spread")
  p.add_argument("--allow_dirty", action="store_true",
                 help="record results from an uncommitted tree, marked \"dirty\": true")
  p.add_argument("--accept", action="store_true",
                 help="set expected.json from the latest results of NAMES (or --quick)")
  p.add_argument("--write_readme", action="store_true",
                 help="rebuild the README Results tables from the results files")
  p.add_argument("--repo", default=str(REPO), help=argparse.SUPPRESS)
  p.add_argument("--results_dir", default=None, help=argparse.SUPPRESS)
  p.add_argument("--expected", default=None, help=argparse.SUPPRESS)
  p.add_argument("--readme", default=None, help=argparse.SUPPRESS)
  return p.parse_args(argv)


class Paths:
  """Where results, expectations and the README live (flags, for tests; else the repo's)."""

  def __init__(self, args):
    self.repo = Path(args.repo).resolve()
    self.results = Path(args.results_dir or self.repo / "experiments" / "results").resolve()
    self.expected = Path(args.expected or self.results / "expected.json").resolve()
    self.readme = Path(args.readme or self.repo / "README.md").resolve()
    self.workroot = Path(args.workroot or self.repo / "workdirs" / "reproduce").resolve()

  def results_file(self, entry) -> Path:
    """Quick entries are checks, not reported figures: their results stay in the work root."""
    folder = self.workroot / "results" if entry.quick else self.results
    return folder / f"{entry.name}.json"


def load_results(paths: Paths, chosen) -> Dict[str, Dict[str, Any]]:
  out = {}
  for entry in chosen:
    path = paths.results_file(entry)
    if path.exists():
      out[entry.name] = json.loads(path.read_text())
  return out


def list_entries(paths: Paths, registry, print_fn=print) -> None:
  expected = bands.load(paths.expected)
  for entry in registry:
    made = "results" if paths.results_file(entry).exists() else "no results"
    over = " ".join(f"--config.{k}={v}" for k, v in entry.overrides.items())
    want = ", ".join(f"{m} {b['value']:.4f}+-{b['tol']:.4f}"
                     for m, b in sorted(expected.get(entry.name, {}).items())) or "no band"
    print_fn(f"{entry.name:30s} {'quick' if entry.quick else 'full ':5s} {made:10s} "
             f"{entry.config} {over}".rstrip() + f"\n{'':30s} {want}")


def write_readme(paths: Paths, registry) -> None:
  full = [e for e in registry if e.table]
  kinds = [k for k in entries_lib.TABLES if any(e.table == k for e in full)]
  readme.update(paths.readme, full, load_results(paths, full), kinds)
  print(f"README tables rewritten from {paths.results}: {paths.readme}")


def run_all(paths: Paths, chosen, seeds, allow_dirty, launcher=None, env=None) -> List[str]:
  """Runs each entry, writes its results file, returns the band failures (and failed runs)."""
  into_tree = [e for e in chosen if not e.quick]
  if into_tree:  # Refuse before anything runs, not after an hour of training.
    provenance.check_clean(provenance.tree_state(paths.repo), allow_dirty)
  for entry in chosen:  # Unknown fields / bad values fail before the first run, too.
    for seed in seeds:
      runner.make_run(entry, paths.workroot, seed)
  expected, problems = bands.load(paths.expected), []
  for index, entry in enumerate(chosen, 1):
    logging.info("[%d/%d] %s", index, len(chosen), entry.name)
    record = runner.run_entry(entry, paths.workroot, paths.repo, seeds, launcher, env)
    if record is None:
      problems.append(f"{entry.name}: the run did not finish (see its log.txt in "
                      f"{paths.workroot / entry.name})")
      continue
    reporting.write_json(paths.results_file(entry), record)
    failed = bands.check(entry.name, record["metrics"], expected)
    shown = ", ".join(f"{m}={v:.4f}" for m, v in record["metrics"].items())
    print(f"{entry.name}: {shown} in {record['wall_s']:.0f} s"
          + (" OUTSIDE ITS BAND" if failed else " ok" if entry.name in expected
             else " (no band in expected.json yet: --accept sets one)"))
    problems += failed
  return problems


def main(argv: Optional[Sequence[str]] = None, registry=None, launcher=None, env=None) -> int:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
  registry = entries_lib.ENTRIES if registry is None else registry
  paths = Paths(args)
  try:
    os.chdir(paths.repo)  # Config specs and data roots are relative to the repository.
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()] or [None]
    if args.list:
      list_entries(paths, registry)
      return 0
    if args.write_readme and not (args.names or args.quick or args.accept):
      write_readme(paths, registry)
      return 0
    chosen = entries_lib.select(registry, args.names, args.quick)
    if args.accept:
      if not (args.names or args.quick):
        raise ValueError("--accept needs entry NAMES (or --quick): expectations move only "
                         "for entries named on purpose.")
      bands.accept([e.name for e in chosen], load_results(paths, chosen), paths.expected)
      return 0
    problems = run_all(paths, chosen, seeds, args.allow_dirty, launcher, env)
    if args.write_readme or any(not e.quick for e in chosen):
      write_readme(paths, registry)
  except (ValueError, FileNotFoundError, provenance.DirtyTreeError) as e:
    print(f"Error: {e}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    return 130
  for line in problems:
    print(f"FAIL {line}", file=sys.stderr)
  return 1 if problems else 0
