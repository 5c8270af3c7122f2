"""`run(config, workdir)`: build data, model, optimizer and state; train; evaluate; checkpoint.

Re-running on the same workdir resumes from the latest checkpoint; a finished
run is not trained again (its final eval is recomputed from the checkpoint).
SIGTERM / SIGINT stop at the next step boundary with a checkpoint of that step
(`tlflax.preemption`); a NaN / Inf loss stops the run before anything non-finite
is saved; `config.early_stopping` stops on a plateau and keeps the best state.
"""
from __future__ import annotations

import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any, Dict

import jax
import jax.numpy as jnp
import ml_collections
from clu import metric_writers

from tlflax import checkpoint, data, models, optim, reporting, sharding, steps, tasks
from tlflax import early_stopping, preemption
from tlflax import workdir as workdir_lib
from tlflax import mixup as mixup_lib
from tlflax import distributed, run_record
from tlflax.transfer import fewshot

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
        image_size=config.data.image_size, fpn_channels=det.fpn_channels,
        head_kwargs=dict(det.get("head_kwargs", {})), **kwargs)
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
      acc = task.eval_accumulate(acc, distributed.host_copy(out), distributed.host_copy(batch))
    else:
      acc = out if acc is None else jax.tree_util.tree_map(jnp.add, acc, out)
  return task.eval_metrics(jax.device_get(acc), pipe.class_names)


def write_run_info(workdir: Path, config, pipe, pp: Dict[str, Any]) -> None:
  reporting.write_json(workdir / "config.json", json.loads(config.to_json_best_effort()))
  reporting.write_json(workdir / "run_info.json", {
      "task": config.get("task", "classification"), "model": config.model.name, "class_names": pipe.class_names,
      "num_classes": len(pipe.class_names), "preprocessing": pp,
      "versions": reporting.package_versions(), "git_commit": reporting.git_commit(),
      "skipped_files": [list(s) for s in pipe.skipped],
      "effective": run_record.effective(config, pipe, total_steps(config, pipe.steps_per_epoch),
                                        pp["weight"])})


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
  lock = workdir_lib.lock(workdir) if jax.process_index() == 0 else None  # One run per DIR.
  pp = preprocessing(config)
  pipe = data.build(config.data, batch_size=config.batch_size,  # Global; the pipeline
                    eval_batch_size=config.eval_batch_size,  # takes this process's rows.
                    seed=config.seed, mean=pp["mean"], std=pp["std"],
                    process_index=jax.process_index(), process_count=jax.process_count())
  num_steps = total_steps(config, pipe.steps_per_epoch)
  module, variables = build_model(config, len(pipe.class_names), num_steps)
  variables = checkpoint.init_variables(config, variables)  # config.init_from, if set.
  tx, labels, schedule = optim.make(config.optim, variables["params"], num_steps,
                                    model_name=config.model.name)
  state = sharding.replicate(steps.create_state(variables, tx), mesh)
  ckpt = checkpoint.Checkpointer(workdir, config.get("keep_checkpoints", 2))
  start, state = ckpt.restore_latest(state)
  if jax.process_index() == 0:
    write_run_info(workdir, config, pipe, pp)
  batch_sharding = sharding.batch_sharding(mesh)
  task = tasks.make(config, module=module, pipe=pipe)
  mixup_lib.check(config.get("mixup", {}), config.get("task", "classification"))
  train_step = jax.jit(steps.make_train_step(module, tx, labels, seed=config.seed, task=task,
                                             mixup=config.get("mixup")),
                       donate_argnums=0)
  eval_step = jax.jit(steps.make_eval_step(module, task))
  fewshot_eval = fewshot.maybe_evaluator(config, module, pipe, pp["mean"], pp["std"])
  writer = metric_writers.create_default_writer(str(workdir), just_logging=jax.process_index() > 0)
  eval_every = config.get("eval_every_steps") or pipe.steps_per_epoch
  log.info("Training %s on %s: %d steps (%d per epoch), start at %d.", config.model.name,
           config.data.name, num_steps, pipe.steps_per_epoch, start)
  try:
    loop = train_loop(config, task, state, train_step, eval_step, pipe, batch_sharding, ckpt,
                      writer, schedule, start, num_steps, eval_every, workdir, fewshot_eval)
    return finish(workdir, task, loop[0], eval_step, pipe, batch_sharding, ckpt, writer,
                  num_steps, loop)
  finally:
    if lock is not None:
      lock.release()


def train_loop(config, task, state, train_step, eval_step, pipe, batch_sharding, ckpt, writer,
               schedule, start, num_steps, eval_every, workdir, fewshot_eval=None):
  """The step loop; returns (state, the last step trained, the early-stopping tracker).

  `fewshot_eval` (`config.fewshot.every_steps` > 0) adds few-shot ridge scalars.

  The host waits for the device only at log, eval and checkpoint steps: loss
  sums and the first non-finite step are accumulated on device in between.
  SIGTERM / SIGINT end the loop at the next step boundary with a checkpoint.
  """
  log_every = config.get("log_every_steps", 50)
  ckpt_every = config.get("checkpoint_every_steps") or eval_every
  stopper = early_stopping.from_config(config, task.main_metric).replay(
      resume_history(workdir, start))
  best = BestCheckpoint(workdir, config, stopper)
  if stopper.should_stop:
    log.info("Early stopping already triggered at step %d (resumed run).", start)
    return state, start, stopper, best
  guard = NonFiniteGuard(ckpt, log_every)
  batches = sharding.prefetch(pipe.train_batches(start_step=start), batch_sharding)
  progress = Progress(start, num_steps, config.batch_size)
  sums, t0, step = None, time.time(), start
  with preemption.watch() as signalled:
    for step in range(start + 1, num_steps + 1):
      state, metrics = train_step(state, next(batches))
      sums = guard.accumulate(sums, metrics, step)
      if step % log_every == 0 or step == num_steps:
        scalars = train_scalars(task, schedule, guard.fetch(sums, step), step, t0)
        writer.write_scalars(step, scalars)
        progress.update(loss=f"{scalars['train/loss']:.3f}")
        sums, t0 = None, time.time()
      else:
        progress.update()
      stop = False
      if step % eval_every == 0 and step != num_steps:
        guard.check(state, step)
        scalars = log_eval(workdir, writer, step,
                           evaluate(task, eval_step, state, pipe, batch_sharding))
        if stopper.update(step, scalars):
          best.save(step, state)
        stop = stopper.should_stop
      if fewshot_eval is not None:
        fewshot_eval.at_step(step, state, writer, workdir)  # Checks every_steps itself.
      preempt = preemption.agreed(signalled, step, log_every)
      if step % ckpt_every == 0 or step == num_steps or stop or preempt:
        guard.check(state, step)
        ckpt.save(step, state, force=True)
      if preempt:
        progress.close()
        ckpt.wait()
        best.wait()
        raise preemption_exit(step, signalled, ckpt)
      if stop:
        log.warning("Early stopping at step %d: %s has not improved for %d evals (best %.4f at "
                    "step %d).", step, stopper.metric, stopper.bad_evals, stopper.best,
                    stopper.best_step)
        break
  progress.close()
  return state, step, stopper, best


def train_scalars(task, schedule, host, step: int, t0: float) -> Dict[str, float]:
  """Mean loss, the task's train metrics, lr and throughput since the last log step."""
  return {"train/loss": host["loss"] / host["count"], **task.train_scalars(host),
          "train/lr": float(schedule(step - 1)),
          "train/img_per_s": host["count"] / (time.time() - t0)}


def preemption_exit(step: int, signalled, ckpt) -> preemption.Preempted:
  error = preemption.Preempted(step, signalled.signum, str(ckpt.directory / str(step)))
  log.warning("%s", error)
  if jax.process_index() == 0:
    print(error, file=sys.stderr, flush=True)
  return error


def resume_history(workdir: Path, start: int):
  """metrics.jsonl up to the restored step; lines of steps after it (a run killed between
  an eval and its checkpoint) are dropped, since those steps run again."""
  path = workdir / "metrics.jsonl"
  if not path.exists():
    return []
  history = reporting.read_jsonl(path)
  kept = [h for h in history if h["step"] <= start]
  if len(kept) < len(history) and jax.process_index() == 0:
    log.info("Dropping %d eval lines after step %d from %s.", len(history) - len(kept), start,
             path)
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(h, sort_keys=True) + "\n" for h in kept))
    tmp.replace(path)
  return kept


class NonFiniteLossError(FloatingPointError):
  """The loss or the parameters became NaN or Inf; nothing after the last good step was saved."""


@jax.jit
def _accumulate(sums, metrics, first_bad, step):
  """Adds the step's metric sums; remembers the first step whose loss is not finite."""
  sums = jax.tree_util.tree_map(jnp.add, sums, metrics)
  bad = jnp.logical_not(jnp.isfinite(metrics["loss"]))
  return sums, jnp.where(bad & (first_bad == 0), step, first_bad)


@jax.jit
def _all_finite(tree) -> jnp.ndarray:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


class NonFiniteGuard:
  """Stops on a NaN / Inf loss with its step, without a host sync per step.

  A device-side scalar keeps the first step whose loss was not finite; the
  host reads it only where it waits anyway (log, eval, checkpoint), and the
  parameters are checked before every save, so a NaN state is never written.
  """

  def __init__(self, ckpt, log_every: int):
    self.ckpt, self.log_every = ckpt, log_every
    self.first_bad = jnp.zeros((), jnp.int32)

  def accumulate(self, sums, metrics, step: int):
    if sums is None:
      sums = jax.tree_util.tree_map(jnp.zeros_like, metrics)
    sums, self.first_bad = _accumulate(sums, metrics, self.first_bad, step)
    return sums

  def fetch(self, sums, step: int):
    host, first_bad = jax.device_get((sums, self.first_bad))
    self._raise_if(int(first_bad), step)
    return host

  def check(self, state, step: int) -> None:
    self._raise_if(int(jax.device_get(self.first_bad)), step)
    if not bool(jax.device_get(_all_finite((state.params, state.model_state)))):
      self._raise_if(step, step, what="the parameters or BatchNorm statistics")

  def _raise_if(self, first_bad: int, step: int, what: str = "the loss") -> None:
    if not first_bad:
      return
    self.ckpt.wait()
    good = self.ckpt.latest_step()
    kept = (f"the last good checkpoint is step {good} in {self.ckpt.directory}" if good
            else "no checkpoint was written before it")
    raise NonFiniteLossError(
        f"Training stopped: {what} became NaN or Inf at step {first_bad} (noticed at step "
        f"{step}; checked every log_every_steps={self.log_every} and before each eval and "
        f"checkpoint). Nothing after that step was saved; {kept}. Lower optim.lr, set "
        "optim.grad_clip_norm or optim.warmup_steps, or check the data for broken labels; the "
        "same command with the changed option resumes from the last good checkpoint.")


class BestCheckpoint:
  """The state of the best eval so far in `DIR/checkpoint_best/<step>` (one kept).

  On with early stopping (`early_stopping.patience`) or `early_stopping.keep_best`.
  """

  def __init__(self, workdir: Path, config, stopper):
    es = config.get("early_stopping") or {}
    on = stopper.patience is not None or bool(es.get("keep_best", False))
    self.ckpt = checkpoint.Checkpointer(workdir, 1, subdir="checkpoint_best") if on else None

  def save(self, step: int, state) -> None:
    if self.ckpt is None:
      return
    for old in self.ckpt.all_steps():
      if old >= step:  # Written by a run killed before its regular checkpoint; redo it.
        self.ckpt.manager.delete(old)
    self.ckpt.save(step, state, force=True)

  def wait(self) -> None:
    if self.ckpt is not None:
      self.ckpt.wait()

  def close(self) -> None:
    if self.ckpt is not None:
      self.ckpt.close()


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


def finish(workdir, task, state, eval_step, pipe, batch_sharding, ckpt, writer, num_steps,
           loop_result):
  """Final eval after the last step -> summary.json (plus best-so-far under `best/`).

  `loop_result` is train_loop's (state, last step, tracker, best checkpoint);
  the last step is below num_steps when early stopping ended the run.
  """
  _, last_step, stopper, best = loop_result
  result = evaluate(task, eval_step, state, pipe, batch_sharding)
  history = (reporting.read_jsonl(workdir / "metrics.jsonl")
             if (workdir / "metrics.jsonl").exists() else [])
  if not history or history[-1]["step"] != last_step:
    log_eval(workdir, writer, last_step, result)
    if stopper.update(last_step, result["scalars"]):
      best.save(last_step, state)
  summary = dict(result["scalars"], step=last_step, **stopper.summary())
  if last_step < num_steps:
    summary["stopped_early"] = True
  if jax.process_index() == 0:
    reporting.write_json(workdir / "summary.json", summary)
  best.close()
  ckpt.close()
  writer.close()
  return summary
