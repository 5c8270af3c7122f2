"""Orbax checkpoints of the train state: save every N steps, resume from the latest.

Orbax writes each step into a temporary folder and renames it when complete,
so a run killed mid-save resumes from the previous complete checkpoint.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


class Checkpointer:
  """A thin wrapper over `ocp.CheckpointManager` for one pytree (the train state)."""

  def __init__(self, workdir: str, max_to_keep: int = 2):
    self.directory = Path(workdir).absolute() / "checkpoints"
    self.manager = ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True))

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, force: bool = False) -> None:
    self.manager.save(step, args=ocp.args.StandardSave(state), force=force)

  def restore(self, template: Any, step: Optional[int] = None) -> Any:
    """Restores into the structure, shapes, dtypes and shardings of `template`."""
    step = self.latest_step() if step is None else step
    abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, template)
    log.info("Restoring checkpoint of step %d from %s", step, self.directory)
    return self.manager.restore(step, args=ocp.args.StandardRestore(abstract))

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
