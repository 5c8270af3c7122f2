"""Multi-host start-up: `jax.distributed.initialize` from the config and the environment.

Every process of a multi-host job runs the same command. Before JAX creates its
backend they must meet at a coordinator (process 0's address and a free port)
and agree on the process count and their own id; after that `jax.devices()`
lists every device of the job, the mesh in `sharding.py` spans all of them,
each process feeds its rows of the global batch (`data/pipeline.py`), and only
process 0 writes logs and summaries (`train.py`). Orbax checkpoints are written
and restored by all processes together (the workdir must be on a file system
every host sees).

Where each setting comes from, first found wins:
  1. `config.distributed.<field>` (`--config.distributed.coordinator_address=...`),
  2. `TLFLAX_COORDINATOR_ADDRESS` (or JAX's `JAX_COORDINATOR_ADDRESS`),
     `TLFLAX_NUM_PROCESSES`, `TLFLAX_PROCESS_ID`, `TLFLAX_LOCAL_DEVICE_IDS`
     (comma-separated),
  3. JAX's own detection of SLURM (`srun`), Open MPI (`mpirun`) and Cloud TPU
     pods, which fills whatever is still unset.

`config.distributed.mode`: "auto" (default) initializes when a coordinator or
a process count above 1 is given, or a multi-task SLURM / Open MPI job or a
multi-host GKE TPU job is seen in the environment, and otherwise runs as one
process; "on" always initializes (Cloud TPU VM pods, whose workers JAX finds
through the TPU metadata server rather than environment variables); "off"
never does. `TLFLAX_DISTRIBUTED=auto|on|off` overrides the config's mode.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Dict, Optional, Sequence

import ml_collections
from ml_collections import config_dict

log = logging.getLogger(__name__)
MODES = ("auto", "on", "off")
ENV = {"coordinator_address": "TLFLAX_COORDINATOR_ADDRESS",
       "num_processes": "TLFLAX_NUM_PROCESSES",
       "process_id": "TLFLAX_PROCESS_ID",
       "local_device_ids": "TLFLAX_LOCAL_DEVICE_IDS"}


def default_config() -> ml_collections.ConfigDict:
  """`config.distributed`: None everywhere means "from the environment, else single-process"."""
  c = ml_collections.ConfigDict()
  c.mode = "auto"  # auto, on, off (see tlflax/distributed.py).
  c.coordinator_address = config_dict.placeholder(str)  # "host:port" of process 0.
  c.num_processes = config_dict.placeholder(int)
  c.process_id = config_dict.placeholder(int)
  c.local_device_ids = config_dict.placeholder(str)  # "0,1": devices this process uses.
  c.initialization_timeout = 300  # Seconds to wait for all processes to join.
  return c


def _int(name: str, value: Any) -> Optional[int]:
  if value is None or value == "":
    return None
  try:
    return int(value)
  except (TypeError, ValueError):
    raise ValueError(f"{name}={value!r} is not an integer; set it to a whole number "
                     "or leave it unset for auto-detection.") from None


def _device_ids(name: str, value: Any) -> Optional[Sequence[int]]:
  if value is None or value == "":
    return None
  if isinstance(value, int):
    return [value]
  try:
    return [int(v) for v in str(value).split(",") if v.strip()]
  except ValueError:
    raise ValueError(f"{name}={value!r} is not a comma-separated list of device ids "
                     "such as '0,1'.") from None


def settings(config: Optional[ml_collections.ConfigDict],
             environ: Optional[Dict[str, str]] = None) -> Dict[str, Any]:
  """The mode and explicit `jax.distributed.initialize` arguments (None = let JAX detect)."""
  environ = os.environ if environ is None else environ
  config = config if config is not None else default_config()
  mode = environ.get("TLFLAX_DISTRIBUTED") or config.get("mode", "auto")
  if mode not in MODES:
    raise ValueError(f"distributed mode {mode!r} (config.distributed.mode or "
                     f"TLFLAX_DISTRIBUTED) is not one of {', '.join(MODES)}.")
  raw = {k: config.get(k) if config.get(k) is not None else environ.get(v)
         for k, v in ENV.items()}
  where = {k: f"config.distributed.{k}" if config.get(k) is not None else v
           for k, v in ENV.items()}
  return {"mode": mode,  # JAX's own variable counts too: JAX would read it anyway.
          "coordinator_address": (raw["coordinator_address"]
                                  or environ.get("JAX_COORDINATOR_ADDRESS") or None),
          "num_processes": _int(where["num_processes"], raw["num_processes"]),
          "process_id": _int(where["process_id"], raw["process_id"]),
          "local_device_ids": _device_ids(where["local_device_ids"], raw["local_device_ids"]),
          "initialization_timeout": int(config.get("initialization_timeout", 300))}


def cluster_in_environment(environ: Optional[Dict[str, str]] = None) -> Optional[str]:
  """The launcher that started several processes of this job, or None.

  Only multi-process jobs count: a one-task `srun` or an interactive `salloc`
  shell runs single-process, without a coordinator.
  """
  environ = os.environ if environ is None else environ
  slurm_step = all(v in environ for v in ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_PROCID",
                                          "SLURM_LOCALID"))  # What JAX reads: inside `srun`.
  if slurm_step and _int("SLURM_NTASKS", environ.get("SLURM_NTASKS") or 1) > 1:
    return "slurm"
  if _int("OMPI_COMM_WORLD_SIZE", environ.get("OMPI_COMM_WORLD_SIZE") or 1) > 1:
    return "ompi"
  if len([h for h in environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1:
    return "tpu"
  return None


def wanted(opts: Dict[str, Any], environ: Optional[Dict[str, str]] = None) -> Optional[str]:
  """Why this process should join a multi-process job (a short reason), or None."""
  if opts["mode"] == "off":
    return None
  if opts["mode"] == "on":
    return "distributed.mode=on"
  if opts["coordinator_address"]:
    return f"coordinator {opts['coordinator_address']}"
  if (opts["num_processes"] or 1) > 1:
    return f"num_processes={opts['num_processes']}"
  cluster = cluster_in_environment(environ)
  return f"{cluster} job" if cluster else None


def initialize(config: Optional[ml_collections.ConfigDict] = None,
               environ: Optional[Dict[str, str]] = None) -> bool:
  """Joins the multi-process job when one is configured or detected; True when it did.

  Must run before anything creates a JAX backend (an array, `jax.devices()`):
  `tlflax.main` calls it right after reading the config.
  """
  opts = settings(config, environ)
  reason = wanted(opts, environ)
  if reason is None:
    return False
  import jax  # pylint: disable=g-import-not-at-top
  if jax.distributed.is_initialized():
    return True
  if jax.config.jax_cpu_collectives_implementation in (None, "none"):
    # CPU processes need a cross-process collective library; gloo ships with jaxlib.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  log.info("jax.distributed.initialize (%s): coordinator=%s num_processes=%s process_id=%s "
           "local_device_ids=%s (None: auto-detected)", reason, opts["coordinator_address"],
           opts["num_processes"], opts["process_id"], opts["local_device_ids"])
  try:
    jax.distributed.initialize(
        coordinator_address=opts["coordinator_address"], num_processes=opts["num_processes"],
        process_id=opts["process_id"], local_device_ids=opts["local_device_ids"],
        initialization_timeout=opts["initialization_timeout"])
  except (ValueError, RuntimeError) as e:
    raise RuntimeError(
        f"Multi-process start-up failed ({reason}): {e}. Set config.distributed."
        "coordinator_address ('host:port' of process 0), num_processes and process_id (or "
        "TLFLAX_COORDINATOR_ADDRESS / TLFLAX_NUM_PROCESSES / TLFLAX_PROCESS_ID), launch with "
        "srun / mpirun so JAX detects them, or set distributed.mode=off for one process.") from e
  log.info("Process %d of %d; %d local of %d devices.", jax.process_index(),
           jax.process_count(), jax.local_device_count(), jax.device_count())
  return True


def describe() -> Dict[str, int]:
  """Process and device counts, for run_info.json."""
  import jax  # pylint: disable=g-import-not-at-top
  return {"process_count": jax.process_count(), "process_index": jax.process_index(),
          "device_count": jax.device_count(), "local_device_count": jax.local_device_count()}


def any_process(flag: bool) -> bool:
  """True on every process when `flag` is True on any process.

  Whatever ends the loop or saves a checkpoint (a SIGTERM that reached some
  processes first, a decision read from a file) must be decided by all
  processes at the same step: orbax saves and every train step are
  collectives, so a process that acts alone leaves the others waiting forever.
  One tiny all-gather; free with a single process.
  """
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_count() == 1:
    return bool(flag)
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return bool(np.asarray(multihost_utils.process_allgather(np.asarray(bool(flag)))).any())


def host_copy(tree: Any) -> Any:
  """numpy copies of (global) arrays, whole on every process.

  `jax.device_get` can only read arrays whose shards all live on this
  process; a batch or a per-example output split across hosts (detection's
  boxes, gathered for COCOeval on the host) is all-gathered first.
  """
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_count() == 1:
    return jax.device_get(tree)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

  def one(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
      return multihost_utils.process_allgather(x, tiled=True)
    return jax.device_get(x)
  return jax.tree_util.tree_map(one, tree)
