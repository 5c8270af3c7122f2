"""SIGTERM / SIGINT -> a checkpoint at the next step boundary and a clean exit.

Cluster schedulers send SIGTERM some seconds before killing a job. A handler
that only sets a flag keeps the step in flight intact; the train loop reads
the flag between steps (a Python bool, no device sync), saves the state of the
last completed step and raises `Preempted`. Running the same command again
resumes at exactly that step: the data order is a pure function of
(seed, step) and dropout keys are folded from the state's step.
"""
from __future__ import annotations

import contextlib
import logging
import signal
import threading
from typing import Iterator, Optional

log = logging.getLogger(__name__)
SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preempted(SystemExit):
  """Raised after the preemption checkpoint is written; exits with 128 + signal number.

  A SystemExit so that `python -m tlflax.main` ends with the shell's usual
  "killed by signal" status (143 for SIGTERM, 130 for Ctrl-C) without a traceback.
  """

  def __init__(self, step: int, signum: int, directory: str):
    self.step, self.signum = step, signum
    self.message = (f"Stopped by {signal.Signals(signum).name} after step {step}; its checkpoint "
                    f"is in {directory}. Run the same command again to resume at step {step}.")
    super().__init__(128 + signum)

  def __str__(self):
    return self.message


class Flag:
  """Which signal arrived (None while none has)."""

  def __init__(self):
    self.signum: Optional[int] = None

  def __bool__(self):
    return self.signum is not None


@contextlib.contextmanager
def watch() -> Iterator[Flag]:
  """Installs flag-setting handlers for SIGTERM and SIGINT, restoring the old ones on exit.

  A second signal gets the previous handler (Ctrl-C twice interrupts at once).
  Outside the main thread signals cannot be caught: the flag just stays unset.
  """
  flag = Flag()
  if threading.current_thread() is not threading.main_thread():
    yield flag
    return
  previous = {s: signal.getsignal(s) for s in SIGNALS}

  def handler(signum, frame):
    del frame
    log.warning("Received %s: saving a checkpoint after the current step, then exiting.",
                signal.Signals(signum).name)
    flag.signum = signum
    for s, h in previous.items():
      signal.signal(s, h)

  for s in SIGNALS:
    signal.signal(s, handler)
  try:
    yield flag
  finally:
    for s, h in previous.items():
      signal.signal(s, h)


def agreed(flag: Flag, step: int, every: int) -> bool:
  """Whether to stop after `step`: at once with one process; with several, all must stop
  at the same step (the save is collective), so they agree at every `every`-th step, where
  the loop waits for the device anyway (an all-gather of one int)."""
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_count() == 1:
    return bool(flag)
  if step % every:
    return False
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  signums = multihost_utils.process_allgather(np.int32(flag.signum or 0))
  if np.any(signums) and not flag:
    flag.signum = int(np.max(signums))
  return bool(np.any(signums))
