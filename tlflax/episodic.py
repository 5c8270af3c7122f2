"""`python -m tlflax.episodic --config configs/X.py --out OUTDIR`: meta-transfer, base/novel.

1. Splits the dataset's classes into disjoint base and novel sets
   (`config.episodic.base_classes` / `novel_classes`; `transfer.episodic`).
2. Baseline: frozen features of the config's pretrained backbone, N-way K-shot
   episodes on the novel classes (train + eval images), classified by
   prototypes (cosine to class means) and by closed-form ridge (the few-shot
   evaluator of `transfer.fewshot`).
3. Episodic fine-tuning: `train_episodes` N-way episodes on the base classes
   (train split only), prototypical head with a learnt cosine scale, the
   parameters chosen by `config.episodic.optim.rules`.
4. The same novel-class episodes again on the fine-tuned features.

Writes OUTDIR/episodic.csv, OUTDIR/episodic.md (mean query accuracy with its
95% confidence interval and wall times) and OUTDIR/training.jsonl, and prints
the table. `config.episodic` defaults to `transfer.episodic.episodic_config()`;
override fields as in `tlflax.main`, e.g. --config.episodic.train_episodes=100.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")

HEADER = ["features", "classes", "classifier", "way", "shot", "query", "episodes", "accuracy",
          "ci95", "seconds"]


def settings(config):
  """`config.episodic` over the defaults, so a config without the section still runs."""
  from tlflax.transfer import episodic  # pylint: disable=g-import-not-at-top
  merged = episodic.episodic_config()
  if config.get("episodic") is not None:
    merged.update(config.episodic.to_dict())
  return merged


def measure(features, labels, classes, ecfg, name: str, which: str) -> List[List[Any]]:
  """Table rows: prototype and ridge accuracy on evaluation episodes over `classes`."""
  from tlflax.transfer import episodic  # pylint: disable=g-import-not-at-top
  rows = []
  for shot in ecfg.eval_shots:
    sampler = episodic.EpisodeSampler(labels, classes, ecfg.way, shot, ecfg.query,
                                      key=(ecfg.seed, episodic.EVAL_STREAM, shot))
    for method in ("prototype", "ridge"):
      t0 = time.time()
      accs = episodic.evaluate(features, sampler, ecfg.eval_episodes, method)
      mean, ci = episodic.mean_ci95(accs)
      rows.append([name, which, method, ecfg.way, shot, ecfg.query, len(accs), f"{mean:.4f}",
                   f"{ci:.4f}", f"{time.time() - t0:.1f}"])
  return rows


def evaluate_all(module, variables, novel_x, novel_y, novel, held_x, held_y, base, ecfg,
                 name: str) -> List[List[Any]]:
  """Rows for the novel classes (the comparison) and the held-out base images (diagnostic)."""
  from tlflax.transfer import episodic  # pylint: disable=g-import-not-at-top
  rows = measure(episodic.features_of(module, variables, novel_x), novel_y, novel, ecfg, name,
                 "novel")
  return rows + measure(episodic.features_of(module, variables, held_x), held_y, base, ecfg,
                        name, "base (eval split)")


def run(config, out: str) -> Dict[str, Any]:
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  from tlflax import data, reporting, train  # pylint: disable=g-import-not-at-top
  from tlflax.fewshot import write_tables  # pylint: disable=g-import-not-at-top
  from tlflax.transfer import episodic  # pylint: disable=g-import-not-at-top
  t_start = time.time()
  out = Path(out)
  ecfg = settings(config)
  pp = train.preprocessing(config)
  pipe = data.build(config.data, batch_size=1, eval_batch_size=64, seed=ecfg.seed,
                    mean=pp["mean"], std=pp["std"])
  base, novel = episodic.class_split(len(pipe.class_names), ecfg.base_classes,
                                     ecfg.novel_classes)
  base_x, base_y = episodic.class_pool(pipe, ["train"], base, pp["mean"], pp["std"])
  novel_x, novel_y = episodic.class_pool(pipe, ["train", "eval"], novel, pp["mean"], pp["std"])
  # Held-out images of the base classes: did training learn them? (A diagnostic only.)
  held_x, held_y = episodic.class_pool(pipe, ["eval"], base, pp["mean"], pp["std"])
  module, variables = train.create_module(config, len(pipe.class_names))
  timings = {"load_seconds": time.time() - t_start}

  t0 = time.time()
  rows = evaluate_all(module, variables, novel_x, novel_y, novel, held_x, held_y, base, ecfg,
                      f"{pp['weight'] or 'random init'} (frozen)")
  timings["frozen_eval_seconds"] = time.time() - t0

  t0 = time.time()
  trainer = episodic.EpisodicTrainer(module, variables, ecfg.optim, ecfg.way, ecfg.train_shot,
                                     ecfg.query, ecfg.train_episodes, ecfg.init_scale)
  sampler = episodic.EpisodeSampler(base_y, base, ecfg.way, ecfg.train_shot, ecfg.query,
                                    key=(ecfg.seed, episodic.TRAIN_STREAM))
  out.mkdir(parents=True, exist_ok=True)
  log_path = out / "training.jsonl"
  log_path.write_text("")
  with tqdm(total=ecfg.train_episodes, unit="episode", dynamic_ncols=True) as bar:
    def log(e, loss, acc):
      reporting.append_jsonl(log_path, {"episode": e + 1, "loss": loss, "query_accuracy": acc,
                                        "scale": trainer.scale})
      bar.update(1)
      bar.set_postfix(loss=f"{loss:.3f}", acc=f"{acc:.2f}")
    history = trainer.train(base_x, sampler, ecfg.train_episodes, log)
  timings["train_seconds"] = time.time() - t0
  timings["train_traces"] = trainer.traces

  t0 = time.time()
  rows += evaluate_all(module, trainer.variables(), novel_x, novel_y, novel, held_x, held_y,
                       base, ecfg, f"episodic fine-tuned ({ecfg.train_episodes} base episodes)")
  timings["tuned_eval_seconds"] = time.time() - t0
  timings["total_seconds"] = time.time() - t_start

  table = write_tables(out, HEADER, rows, "episodic")
  last = history[-min(50, len(history)):] if history else []
  info = {"dataset": config.data.name, "image_size": config.data.image_size,
          "model": config.model.name, "base_classes": list(base), "novel_classes": list(novel),
          "base_train_images": len(base_y), "novel_images": len(novel_y),
          "final_scale": trainer.scale, "train_loss_last50": float(sum(h[0] for h in last)
                                                                  / max(1, len(last))),
          **timings}
  reporting.write_json(out / "episodic_info.json", info)
  print(f"Episodic transfer on {config.data.name}: base classes {list(base)} "
        f"({len(base_y)} train images), novel classes {list(novel)} ({len(novel_y)} images); "
        f"fine-tuning {ecfg.train_episodes} episodes took {timings['train_seconds']:.1f} s "
        f"(step traced {trainer.traces}x), whole command {timings['total_seconds']:.1f} s")
  print(table)
  return {"rows": rows, **info}


def main(argv=None) -> None:
  from absl import app, flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config_flag = config_flags.DEFINE_config_file("config", None, "Experiment config file.")
  flags.DEFINE_string("out", None, "Output folder.")
  flags.mark_flags_as_required(["config", "out"])

  def _run(unused_argv):
    from tlflax import xla_env  # pylint: disable=g-import-not-at-top
    xla_env.configure()
    result = run(config_flag.value, flags.FLAGS.out)
    print(json.dumps({"out": flags.FLAGS.out, "seconds": round(result["total_seconds"], 1)}))

  app.run(_run, argv)


if __name__ == "__main__":
  from tlflax.config import check_overrides  # pylint: disable=g-import-not-at-top
  check_overrides(sys.argv)
  main()
