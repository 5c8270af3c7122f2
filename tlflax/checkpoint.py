"""Orbax checkpoints of the train state: save every N steps, resume from the latest.

Orbax writes each step into `<step>.orbax-checkpoint-tmp-*` and renames it
when complete, so a run killed mid-save leaves only a temporary folder, which
`latest_step` ignores. A step folder that is there but cannot be read (a disk
error, a partial copy) is moved aside to `DIR/corrupt_checkpoints/` with a
warning, and the run resumes from the newest readable step instead.
"""
from __future__ import annotations

import errno
import logging
import re
import shutil
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import jax
import numpy as np
import orbax.checkpoint as ocp

from tlflax.pretrained import load

log = logging.getLogger(__name__)


class DiskFullError(OSError):
  """A checkpoint could not be written for lack of space; earlier ones are intact."""


class CheckpointMismatchError(ValueError):
  """The checkpoint was saved by a model whose parameters differ from this config's."""


class UnreadableCheckpointError(RuntimeError):
  """A step folder whose metadata or arrays cannot be read back (damaged, partial copy)."""


MAX_REPORTED = 30  # Lines of a mismatch report; an optimizer change touches every slot.


def _is_disk_full(error: BaseException) -> bool:
  """ENOSPC / EDQUOT anywhere in the exception chain (orbax and tensorstore wrap errors)."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
      return True
    if "No space left on device" in str(error):
      return True
    error = error.__cause__ or error.__context__
  return False


class Checkpointer:
  """A thin wrapper over `ocp.CheckpointManager` for one pytree (the train state)."""

  def __init__(self, workdir: str, max_to_keep: int = 2, subdir: str = "checkpoints"):
    self.workdir = Path(workdir).absolute()
    self.directory = self.workdir / subdir
    self.max_to_keep = max_to_keep
    self.manager = self._manager()

  def _manager(self) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(
        self.directory, item_handlers=ocp.StandardCheckpointHandler(),  # Metadata before restore.
        options=ocp.CheckpointManagerOptions(max_to_keep=self.max_to_keep, create=True))

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def all_steps(self) -> List[int]:
    return sorted(self.manager.all_steps())

  def save(self, step: int, state: Any, force: bool = False) -> None:
    try:
      self.manager.save(step, args=ocp.args.StandardSave(state), force=force)
    except Exception as e:  # pylint: disable=broad-except
      self._raise_disk_full(e, step)
      raise

  def wait(self) -> None:
    """Blocks until the asynchronous save in flight is on disk."""
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      self._raise_disk_full(e, None)
      raise

  def _raise_disk_full(self, error: BaseException, step: Optional[int]) -> None:
    if not _is_disk_full(error):
      return
    kept = [s for s in self.all_steps() if s != step]
    raise DiskFullError(
        errno.ENOSPC,
        f"No space left on device while writing checkpoint"
        f"{'' if step is None else f' of step {step}'} to {self.directory}. Earlier checkpoints "
        f"are intact (steps {kept or 'none'}). Free space (or move the workdir to a larger "
        "disk, or lower keep_checkpoints) and run the same command again to resume.") from error

  def restore(self, template: Any, step: Optional[int] = None) -> Any:
    """Restores into the structure, shapes, dtypes and shardings of `template`.

    The stored shapes are compared first, so a checkpoint of another model
    is reported in full (CheckpointMismatchError) and never taken for a
    damaged one (UnreadableCheckpointError).
    """
    step = self.latest_step() if step is None else step
    try:
      metadata = self.manager.item_metadata(step)
    except Exception as e:  # pylint: disable=broad-except
      raise UnreadableCheckpointError(f"step {step}: metadata unreadable ({e})") from e
    if metadata is not None:  # None: orbax cannot tell; the restore below still checks.
      self._check_shapes(step, _flat_shapes(template), _flat_shapes(metadata.tree))
    abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, template)
    log.info("Restoring checkpoint of step %d from %s", step, self.directory)
    try:
      return self.manager.restore(step, args=ocp.args.StandardRestore(abstract))
    except Exception as e:  # pylint: disable=broad-except
      raise UnreadableCheckpointError(f"step {step}: {type(e).__name__}: {e}") from e

  def restore_latest(self, template: Any) -> Tuple[int, Any]:
    """(step, state) of the newest readable checkpoint, or (0, template) when there is none.

    An unreadable step folder is moved aside and the next older one is tried,
    so a damaged latest checkpoint costs the steps since the previous one
    instead of the run. A checkpoint from a model of other shapes is an error.
    """
    for step in reversed(self.all_steps()):
      try:
        return step, self.restore(template, step)
      except UnreadableCheckpointError as e:
        self._move_aside(step, e)
    return 0, template

  def _move_aside(self, step: int, error: BaseException) -> None:
    target = self.workdir / "corrupt_checkpoints" / f"{step}-{int(time.time())}"
    log.warning("Checkpoint step %d in %s cannot be restored (%s); moving it to %s and "
                "resuming from the previous checkpoint.", step, self.directory,
                str(error).splitlines()[0][:300], target)
    if jax.process_index() == 0:  # One mover on a shared folder; the others wait for it.
      target.parent.mkdir(parents=True, exist_ok=True)
      shutil.move(str(self.directory / str(step)), str(target))
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      multihost_utils.sync_global_devices(f"tlflax_move_aside_{step}")
    self.manager.close()
    self.manager = self._manager()

  def _check_shapes(self, step: int, model: Dict[str, tuple], stored: Dict[str, tuple]) -> None:
    """Every differing parameter, statistic and optimizer slot, not orbax's first one."""
    problems = shape_report(model, stored)
    if not problems:
      return
    shown = problems[:MAX_REPORTED] + (
        [f"... and {len(problems) - MAX_REPORTED} more"] if len(problems) > MAX_REPORTED else [])
    raise CheckpointMismatchError(
        f"Checkpoint step {step} in {self.directory} does not fit this run "
        f"({len(problems)} differences):\n  " + "\n  ".join(shown) +
        f"\nThis workdir was trained with another model, class count or optimizer. To "
        f"fine-tune from its weights, start a new --workdir with --config.init_from="
        f"{self.workdir} and --config.init_reinit='params/head/.*' (the parameters to "
        "re-initialise when their shapes differ).")

  def close(self) -> None:
    self.wait()
    self.manager.close()


def _key_name(key) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def _flat_shapes(tree: Any) -> Dict[str, Tuple[int, ...]]:
  """{"params/head/kernel": shape, "opt_state/1/0/trace/...": shape} of a state or its metadata.

  A TrainState and orbax's metadata tree flatten to the same names.
  """
  leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))[0]
  return {"/".join(_key_name(k) for k in path): tuple(leaf.shape) for path, leaf in leaves}


def shape_report(model: Dict[str, tuple], stored: Dict[str, tuple]) -> List[str]:
  """One line per parameter that is missing, unexpected or of another shape."""
  problems = [f"shape mismatch: {k} model {model[k]} checkpoint {stored[k]}"
              for k in sorted(model) if k in stored and model[k] != stored[k]]
  problems += [f"missing in checkpoint: {k} {model[k]}" for k in sorted(model) if k not in stored]
  problems += [f"unexpected in checkpoint: {k} {stored[k]}"
               for k in sorted(stored) if k not in model]
  return problems


def step_folder(path: str) -> Path:
  """A workdir, its checkpoints/ folder or one step folder -> the step folder to read."""
  path = Path(path).absolute()
  if (path / "default").is_dir():
    return path
  folder = path / "checkpoints" if (path / "checkpoints").is_dir() else path
  steps = sorted(int(p.name) for p in folder.glob("*") if re.fullmatch(r"\d+", p.name))
  if not steps:
    raise FileNotFoundError(
        f"init_from={str(path)!r} holds no checkpoint: give a workdir (with checkpoints/), its "
        "checkpoints/ folder, or one step folder such as WORKDIR/checkpoints/200.")
  return folder / str(steps[-1])


def initialise_from(path: str, variables: Dict[str, Any], reinit: Optional[str] = None):
  """`variables` filled from another run's checkpoint (params and BatchNorm statistics).

  Strict like pretrained weights: every variable must be there with its
  shape, except those matching `reinit` (a regex over `params/head/kernel`
  style paths), which keep their fresh initialisation when they differ and
  are reported. The optimizer state and step are not taken: this starts a
  new run from trained weights, it does not resume one.
  """
  folder = step_folder(path)
  with ocp.StandardCheckpointer() as ckptr:
    restored = ckptr.restore(folder / "default")
  stored = load.flatten({"params": restored["params"], **restored.get("model_state", {})})
  stored = {k: np.asarray(v) for k, v in stored.items()}
  try:
    merged, report = load.merge(variables, stored, reinit=reinit or r"(?!)")
  except load.PretrainedMismatchError as e:
    raise CheckpointMismatchError(
        f"init_from={str(folder)!r}: {e}\nTo re-initialise the differing parameters instead "
        "(a new class count), add --config.init_reinit='params/head/.*' (a regex over these "
        "paths).") from None
  log.warning("Initialised from %s: %d tensors loaded; re-initialised: %s.", folder,
              len(report["loaded"]), load.summarise_keys(report["reinitialised"]) or "none")
  return merged, report


def init_variables(config, variables: Dict[str, Any]) -> Dict[str, Any]:
  """`config.init_from` applied to a fresh model's variables (unchanged when unset)."""
  if not config.get("init_from"):
    return variables
  merged, _ = initialise_from(config.init_from, variables, config.get("init_reinit"))
  return merged
