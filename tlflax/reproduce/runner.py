"""Runs an entry as `python -m tlflax.main` subprocesses and turns its workdirs into a results file.

The subprocess, its log, the "is this workdir finished for this exact request" test and the
resume-on-rerun behaviour are the sweep runner's (`tlflax.experiments`), so that a reproduce
entry and a sweep run of the same config behave the same way.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from tlflax import experiments
from tlflax.reproduce import provenance
from tlflax.reproduce.entries import Entry

log = logging.getLogger("tlflax.reproduce")
MEAN = "mean/"  # "mean/train/loss": the mean of every logged train/loss value of the run.


def workdir_for(entry: Entry, root: Path, seed: Optional[int]) -> Path:
  return root / entry.name if seed is None else root / entry.name / f"seed={seed}"


def make_run(entry: Entry, root: Path, seed: Optional[int] = None) -> experiments.Run:
  """The entry as a sweep `Run`; unknown fields and bad values fail here, before any run."""
  overrides = dict(entry.overrides)
  if seed is not None:
    overrides["seed"] = seed
  run = experiments.Run(name=entry.name, config=entry.config, overrides=overrides, varied={},
                        variant=entry.name, workdir=workdir_for(entry, root, seed), seed=seed)
  experiments.validate(run, experiments.Sweep(name="reproduce", base=entry.config))
  return run


def figures(entry: Entry, workdir: Path) -> Dict[str, Any]:
  """The entry's figures from a finished workdir (summary.json; `train/...` from TensorBoard)."""
  summary = experiments.read_json(workdir / "summary.json", {}) or {}
  out = {}
  for metric in entry.metrics:
    mean = metric.startswith(MEAN)
    if mean or metric.startswith("train/"):
      curve = [v for _, v in experiments.train_curve(workdir, metric[len(MEAN):] if mean
                                                      else metric)]
      if curve:
        out[metric] = sum(curve) / len(curve) if mean else curve[-1]
    elif metric in summary:
      out[metric] = summary[metric]
  return out


def best_of(entry: Entry, workdir: Path) -> Dict[str, Any]:
  """Best eval of the first figure over the run (README shows it beside the final one)."""
  metric = entry.metrics[0]
  history = [h for h in experiments.read_jsonl(workdir / "metrics.jsonl") if metric in h]
  if not history:
    return {}
  pick = min if experiments.lower_is_better(metric) else max
  row = pick(history, key=lambda h: h[metric])
  return {metric: row[metric], "step": row["step"]}


def run_one(run: experiments.Run, repo: Path, launcher=None, env=None) -> Dict[str, Any]:
  """Trains the run unless its workdir is finished; returns its record (status, stamp)."""
  state = experiments.run_state(run)
  record = experiments.read_json(run.workdir / experiments.RECORD, {}) or {}
  if state == "done":
    log.info("%s: finished in %s, not rerun.", run.name, run.workdir)
    return dict(record, status="done", skipped=True)
  before = provenance.stamp(repo)
  command = experiments.command_for(run, run.workdir.parent, launcher)
  log.info("%s: %s (%s); log: %s", run.name, "resuming" if state == "interrupted" else "running",
           " ".join(command[2:]), run.workdir / experiments.LOG_FILE)
  status, rc, seconds = experiments.execute(command, run.workdir, env=env)
  after = provenance.tree_state(repo)
  if (after["commit"], after["dirty"]) != (before["commit"], before["dirty"]):
    log.warning("%s: the tree changed during the run (now %s%s); stamped dirty.", run.name,
                after["commit"][:12], " + changes" if after["dirty"] else "")
    before["dirty"] = True
  previous = record.get("stamp", {}).get("commit")
  if previous not in (None, before["commit"]):
    before["dirty"] = True  # Resumed across commits: no single commit made it.
    before["resumed_from_commit"] = previous
  record = experiments.record_attempt(run.workdir, run.request(), status, rc, seconds,
                                      {"name": run.name, "command": command, "stamp": before})
  if status != "done":
    log.error("%s: %s (rc %s); log: %s", run.name, status, rc, run.workdir / experiments.LOG_FILE)
  return dict(record, skipped=False)


def results_for(entry: Entry, runs: Sequence[experiments.Run],
                records: Sequence[Dict[str, Any]], repo: Path) -> Dict[str, Any]:
  """The results file's content: figures (mean over seeds), wall time, stamp, per-seed detail."""
  per_run = [figures(entry, r.workdir) for r in runs]
  metrics = {m: sum(f[m] for f in per_run) / len(per_run) for m in entry.metrics
             if all(m in f for f in per_run)}
  stamp = records[-1].get("stamp") or dict(provenance.stamp(repo), stamped="at collection")
  # overrides, command, summary, best, workdir: the first seed's run (the others under seeds).
  out = {"name": entry.name, "config": entry.config, "overrides": runs[0].cli,
         "command": records[0].get("command"), "metrics": metrics,
         "wall_s": round(sum(r.get("wall_s") or 0.0 for r in records), 1),
         "summary": experiments.read_json(runs[0].workdir / "summary.json", {}),
         "best": best_of(entry, runs[0].workdir), "workdir": str(runs[0].workdir), **stamp}
  out["dirty"] = any((r.get("stamp") or stamp).get("dirty") for r in records)
  commits = sorted({(r.get("stamp") or stamp).get("commit") for r in records})
  if len(commits) > 1:
    out["commits"], out["dirty"] = commits, True  # Seeds run on different commits.
  if len(runs) > 1:
    out["seeds"] = {str(r.seed): {"metrics": f, "wall_s": rec.get("wall_s")}
                    for r, f, rec in zip(runs, per_run, records)}
    out["spread"] = {m: max(f[m] for f in per_run) - min(f[m] for f in per_run)
                     for m in metrics}
  return out


def run_entry(entry: Entry, root: Path, repo: Path, seeds: Sequence[Optional[int]] = (None,),
              launcher=None, env=None) -> Optional[Dict[str, Any]]:
  """Runs (or resumes, or skips) every seed of the entry; None when one did not finish."""
  runs = [make_run(entry, root, seed) for seed in seeds]
  records: List[Dict[str, Any]] = [run_one(r, repo, launcher, env) for r in runs]
  if any(r["status"] != "done" for r in records):
    return None
  return results_for(entry, runs, records, repo)
