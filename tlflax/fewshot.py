"""`python -m tlflax.fewshot --config configs/X.py [--workdir DIR] --out OUTDIR`: k-shot accuracy.

Closed-form ridge on frozen features (see `tlflax.transfer.fewshot`), k images
per class drawn from the config's train split, scored on its eval split, mean
and spread over seeded draws. Without --workdir the features are the config's
pretrained backbone (its ImageNet weight); with --workdir, the backbone of that
trained run (its own preprocessing: image size, crop, mean/std).

Writes OUTDIR/fewshot.csv and OUTDIR/fewshot.md and prints the table. Any
config field can be overridden as in `tlflax.main`, e.g. --config.data.image_size=64.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")

import numpy as np  # noqa: E402

HEADER = ["model", "shots", "draws", "accuracy", "std", "min", "max", "l2_reg", "seconds"]


def load_model(config, workdir: Optional[str]):
  """(module, variables, mean, std, label) of a trained run, or of the config's pretrained model.

  A run's own preprocessing replaces the config's, so its features are read
  the way it was trained.
  """
  from tlflax import predict, train  # pylint: disable=g-import-not-at-top
  if workdir:
    model = predict.TrainedModel(workdir)
    pp = model.info["preprocessing"]
    with config.unlocked():
      config.data.image_size = int(pp["image_size"])
      config.data.resize_size = pp.get("resize_size")
      config.data.eval_crop = pp.get("eval_crop") or config.data.eval_crop
    return (model.module, model.variables, tuple(pp["mean"]), tuple(pp["std"]),
            f"{workdir} (step {model.step})")
  pp = train.preprocessing(config)
  module, variables = train.create_module(config, 1000)
  label = f"{config.model.name} {pp['weight'] or 'random init'}"
  return module, variables, pp["mean"], pp["std"], label


def rows_of(label: str, accuracies: Dict[int, List[float]], l2_reg: float,
            seconds: float) -> List[List[Any]]:
  rows = []
  for k, accs in accuracies.items():
    a = np.asarray(accs)
    rows.append([label, k, len(a), f"{a.mean():.4f}", f"{a.std():.4f}", f"{a.min():.4f}",
                 f"{a.max():.4f}", l2_reg, f"{seconds:.1f}"])
  return rows


def markdown(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in rows]
  return "\n".join(lines) + "\n"


def write_tables(out: Path, header, rows, stem: str) -> str:
  from tlflax import predict  # pylint: disable=g-import-not-at-top
  predict.write_csv(out / f"{stem}.csv", header, rows)
  table = markdown(header, rows)
  (out / f"{stem}.md").write_text(table)
  return table


def run(config, workdir: Optional[str], out: str, shots: Sequence[int], draws: int,
        seed: int = 0, l2_reg: Optional[float] = None, batch_size: int = 64) -> Dict[str, Any]:
  """Measures and writes the table; returns {"rows": ..., "seconds": ...}."""
  from tlflax import data  # pylint: disable=g-import-not-at-top
  from tlflax.transfer import fewshot  # pylint: disable=g-import-not-at-top
  t0 = time.time()
  l2_reg = fewshot.DEFAULT_L2_REG if l2_reg is None else l2_reg
  module, variables, mean, std, label = load_model(config, workdir)
  pipe = data.build(config.data, batch_size=1, eval_batch_size=batch_size, seed=seed,
                    mean=mean, std=std)
  measure = fewshot.FewShot(pipe, mean, std, shots, draws, seed, l2_reg, batch_size)
  t1 = time.time()
  accuracies = measure.measure(fewshot.feature_function(module), variables)
  seconds = time.time() - t1
  rows = rows_of(label, accuracies, l2_reg, seconds)
  table = write_tables(Path(out), HEADER, rows, "fewshot")
  print(f"Few-shot ridge accuracy on {config.data.name} eval ({len(measure.test_labels)} images, "
        f"{measure.num_classes} classes; support from train, {len(measure.needed)} images "
        f"featurised); features + ridge {seconds:.1f} s, whole command {time.time() - t0:.1f} s")
  print(table)
  return {"rows": rows, "seconds": time.time() - t0}


def main(argv=None) -> None:
  from absl import app, flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config_flag = config_flags.DEFINE_config_file("config", None, "Experiment config file.")
  flags.DEFINE_string("workdir", None, "A tlflax.main run whose backbone to use instead of "
                      "the config's pretrained one.")
  flags.DEFINE_string("out", None, "Output folder for fewshot.csv / fewshot.md.")
  flags.DEFINE_list("shots", [str(k) for k in (1, 5, 10, 25)], "Images per class, e.g. 1,5.")
  flags.DEFINE_integer("draws", 5, "Seeded support draws per shot count.")
  flags.DEFINE_integer("seed", 0, "Seed of the draws.")
  flags.DEFINE_float("l2_reg", None, "Ridge strength (default: transfer.fewshot.DEFAULT_L2_REG).")
  flags.DEFINE_integer("batch_size", 64, "Images per forward pass.")
  flags.mark_flags_as_required(["config", "out"])

  def _run(unused_argv):
    from tlflax import xla_env  # pylint: disable=g-import-not-at-top
    xla_env.configure()
    f = flags.FLAGS
    result = run(config_flag.value, f.workdir, f.out, [int(k) for k in f.shots], f.draws,
                 f.seed, f.l2_reg, f.batch_size)
    print(json.dumps({"out": f.out, "seconds": round(result["seconds"], 1)}))

  app.run(_run, argv)


if __name__ == "__main__":
  from tlflax.config import check_overrides  # pylint: disable=g-import-not-at-top
  check_overrides(sys.argv)
  main()
