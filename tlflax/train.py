"""`run(config, workdir)`: build data, model, optimizer and state; train; evaluate; checkpoint.

Re-running on the same workdir resumes from the latest checkpoint; a finished
run is not trained again (its final eval is recomputed from the checkpoint).
"""
from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Dict

import jax
import jax.numpy as jnp
import ml_collections
from clu import metric_writers

from tlflax import checkpoint, data, models, optim, reporting, sharding, steps, tasks
from tlflax import mixup as mixup_lib

log = logging.getLogger(__name__)
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def preprocessing(config) -> Dict[str, Any]:
  """Mean/std and sizes: from the config, else from the pretrained weight's config."""
  weight = models.weight_config(config.model.name, config.model.pretrained)
  mean = config.model.get("mean") or (weight.mean if weight else (0.485, 0.456, 0.406))
  std = config.model.get("std") or (weight.std if weight else (0.229, 0.224, 0.225))
  return {"mean": tuple(mean), "std": tuple(std), "image_size": config.data.image_size,
          "resize_size": config.data.get("resize_size"), "eval_crop": config.data.get("eval_crop"),
          "weight": weight.tag if weight else None}


def frozen_bn_patterns(bn_mode: str, labels) -> tuple:
  """BatchNorm layers that keep their running statistics during training."""
  if bn_mode == "train":
    return ()
  if bn_mode == "frozen":
    return (".*",)
  if bn_mode == "follow_params":
    paths = [p for p, label in zip(optim.parameter_paths(labels), jax.tree_util.tree_leaves(labels))
             if p.endswith("/scale") and label == optim.FROZEN]
    return tuple(p[:-len("/scale")].replace(".", r"\.") for p in paths)
  raise ValueError(f"model.bn_mode={bn_mode!r}; choose train, frozen or follow_params.")


def create_module(config, num_classes: int):
  """The task's model: a classifier, or a segmentation decoder on the backbone."""
  mcfg = config.model
  kwargs = dict(num_classes=num_classes, weights_dir=mcfg.get("weights_dir"),
                dtype=DTYPES[mcfg.get("dtype", "float32")], seed=config.seed,
                **dict(mcfg.get("kwargs", {})))
  task = config.get("task", "classification")
  if task == "segmentation":
    seg = config.segmentation
    return models.create_segmentation_model(
        seg.head, mcfg.name, pretrained_backbone=mcfg.pretrained,
        output_stride=seg.output_stride, aux=seg.aux, **kwargs)
  if task == "detection":
    det = config.detection
    return models.create_detection_model(
        det.head, mcfg.name, pretrained_backbone=mcfg.pretrained,
        image_size=config.data.image_size, fpn_channels=det.fpn_channels, **kwargs)
  if task != "classification":
    raise ValueError(f"config.task={task!r} has no model builder; use classification, "
                     "segmentation or detection.")
  return models.create_model(mcfg.name, pretrained=mcfg.pretrained, dropout=mcfg.get("dropout"),
                             **kwargs)


def build_model(config, num_classes: int, num_steps: int = 1):
  """Module + variables, then the optimizer and labels; BN freezing needs the labels."""
  mcfg = config.model
  module, variables = create_module(config, num_classes)
  labels = optim.labels_for(config.optim, variables["params"], num_steps, mcfg.name)
  patterns = frozen_bn_patterns(mcfg.get("bn_mode", "train"), labels)
  if patterns:
    module = module.clone(backbone=module.backbone.clone(frozen_bn=patterns))
  return module, variables


def total_steps(config, steps_per_epoch: int) -> int:
  if config.get("total_steps"):
    return int(config.total_steps)
  return max(1, int(math.ceil(config.num_epochs * steps_per_epoch)))


def evaluate(task, eval_step, state, pipe, batch_sharding) -> Dict[str, Any]:
  """One pass over eval: sums added on device, or the task's own host accumulation."""
  acc = None
  for batch in sharding.prefetch(pipe.eval_batches(), batch_sharding):
    out = eval_step(state, batch)
    if task.eval_accumulate is not None:
      acc = task.eval_accumulate(acc, jax.device_get(out), jax.device_get(batch))
    else:
      acc = out if acc is None else jax.tree_util.tree_map(jnp.add, acc, out)
  return task.eval_metrics(jax.device_get(acc), pipe.class_names)


def write_run_info(workdir: Path, config, pipe, pp: Dict[str, Any]) -> None:
  reporting.write_json(workdir / "config.json", json.loads(config.to_json_best_effort()))
  reporting.write_json(workdir / "run_info.json", {
      "task": config.get("task", "classification"), "model": config.model.name, "class_names": pipe.class_names,
      "num_classes": len(pipe.class_names), "preprocessing": pp,
      "versions": reporting.package_versions(), "git_commit": reporting.git_commit(),
      "skipped_files": [list(s) for s in pipe.skipped]})


class Progress:
  """tqdm bar with images/s and ETA (quiet on non-zero processes)."""

  def __init__(self, start: int, total: int, batch_size: int):
    from tqdm import tqdm
    self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True,
                    disable=jax.process_index() != 0, mininterval=2.0)
    self.batch_size, self.t0, self.n = batch_size, time.time(), 0

  def update(self, **postfix):
    self.n += 1
    self.bar.update(1)
    if postfix:
      rate = self.n * self.batch_size / max(1e-9, time.time() - self.t0)
      self.bar.set_postfix(img_s=f"{rate:.1f}", **postfix)

  def close(self):
    self.bar.close()


def run(config: ml_collections.ConfigDict, workdir: str) -> Dict[str, Any]:
  """Trains and evaluates; returns the summary written to `workdir/summary.json`."""
  workdir = Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  mesh = sharding.make_mesh()
  sharding.check_batch_size(config.batch_size, "batch_size")
  sharding.check_batch_size(config.eval_batch_size, "eval_batch_size")
  pp = preprocessing(config)
  pipe = data.build(config.data, batch_size=config.batch_size // jax.process_count(),
                    eval_batch_size=config.eval_batch_size // jax.process_count(),
                    seed=config.seed, mean=pp["mean"], std=pp["std"],
                    process_index=jax.process_index(), process_count=jax.process_count())
  num_steps = total_steps(config, pipe.steps_per_epoch)
  module, variables = build_model(config, len(pipe.class_names), num_steps)
  tx, labels, schedule = optim.make(config.optim, variables["params"], num_steps,
                                    model_name=config.model.name)
  state = sharding.replicate(steps.create_state(variables, tx), mesh)
  ckpt = checkpoint.Checkpointer(workdir, config.get("keep_checkpoints", 2))
  start = ckpt.latest_step() or 0
  if start:
    state = ckpt.restore(state)
  if jax.process_index() == 0:
    write_run_info(workdir, config, pipe, pp)
  batch_sharding = sharding.batch_sharding(mesh)
  task = tasks.make(config, module=module, pipe=pipe)
  mixup_lib.check(config.get("mixup", {}), config.get("task", "classification"))
  train_step = jax.jit(steps.make_train_step(module, tx, labels, seed=config.seed, task=task,
                                             mixup=config.get("mixup")),
                       donate_argnums=0)
  eval_step = jax.jit(steps.make_eval_step(module, task))
  writer = metric_writers.create_default_writer(str(workdir), just_logging=jax.process_index() > 0)
  eval_every = config.get("eval_every_steps") or pipe.steps_per_epoch
  log.info("Training %s on %s: %d steps (%d per epoch), start at %d.", config.model.name,
           config.data.name, num_steps, pipe.steps_per_epoch, start)
  state, last = train_loop(config, task, state, train_step, eval_step, pipe, batch_sharding,
                           ckpt, writer, schedule, start, num_steps, eval_every, workdir)
  return finish(workdir, task, state, eval_step, pipe, batch_sharding, ckpt, writer, num_steps,
                last)


def train_loop(config, task, state, train_step, eval_step, pipe, batch_sharding, ckpt, writer,
               schedule, start, num_steps, eval_every, workdir):
  """The step loop; returns the final state and the last eval's metrics (or None)."""
  log_every = config.get("log_every_steps", 50)
  ckpt_every = config.get("checkpoint_every_steps") or eval_every
  batches = sharding.prefetch(pipe.train_batches(start_step=start), batch_sharding)
  progress = Progress(start, num_steps, config.batch_size)
  sums, last, t0 = None, None, time.time()
  for step in range(start + 1, num_steps + 1):
    state, metrics = train_step(state, next(batches))
    sums = metrics if sums is None else jax.tree_util.tree_map(jnp.add, sums, metrics)
    if step % log_every == 0 or step == num_steps:
      host = jax.device_get(sums)
      scalars = {"train/loss": host["loss"] / host["count"], **task.train_scalars(host),
                 "train/lr": float(schedule(step - 1)),
                 "train/img_per_s": host["count"] / (time.time() - t0)}
      writer.write_scalars(step, scalars)
      progress.update(loss=f"{scalars['train/loss']:.3f}")
      sums, t0 = None, time.time()
    else:
      progress.update()
    if step % eval_every == 0 and step != num_steps:
      last = log_eval(workdir, writer, step,
                      evaluate(task, eval_step, state, pipe, batch_sharding))
    if step % ckpt_every == 0 or step == num_steps:
      ckpt.save(step, state)
  progress.close()
  return state, last


def log_eval(workdir: Path, writer, step: int, result: Dict[str, Any]) -> Dict[str, Any]:
  scalars = result["scalars"]
  writer.write_scalars(step, scalars)
  writer.flush()
  if jax.process_index() == 0:
    reporting.append_jsonl(workdir / "metrics.jsonl", {"step": step, **scalars})
    reporting.write_json(workdir / "eval_report.json", {"step": step, **result})
  log.info("eval at step %d: %s", step, ", ".join(f"{k}={v:.4f}" for k, v in scalars.items()
                                                   if isinstance(v, float)))
  return scalars


def finish(workdir, task, state, eval_step, pipe, batch_sharding, ckpt, writer, num_steps, last):
  """Final eval after the last step -> summary.json (plus best-so-far under `best/`)."""
  result = evaluate(task, eval_step, state, pipe, batch_sharding)
  history = (reporting.read_jsonl(workdir / "metrics.jsonl")
             if (workdir / "metrics.jsonl").exists() else [])
  if not history or history[-1]["step"] != num_steps:
    log_eval(workdir, writer, num_steps, result)
    history = reporting.read_jsonl(workdir / "metrics.jsonl")
  summary = dict(result["scalars"], step=num_steps)
  scored = [h for h in history if task.main_metric in h]
  best = max(scored, key=lambda h: h[task.main_metric])
  summary[f"best/{task.main_metric}"] = best[task.main_metric]
  summary["best/step"] = best["step"]
  if jax.process_index() == 0:
    reporting.write_json(workdir / "summary.json", summary)
  ckpt.close()
  writer.close()
  return summary
