"""Multi-host: two processes on loopback (gloo CPU collectives) train as one process does.

Every run is the real command, `python -m tlflax.main`, on a tiny digits config
(random MobileNetV2 x0.25, 32 px, global batch 16, BatchNorm in train mode so
its statistics are a cross-process reduction too; the last stages and head
trained with momentum SGD at a constant 0.01). This random-init net amplifies
rounding: at lr 0.05 with every stage trained, 1 vs 2 devices drift from 6e-7 to
7e-3 in three steps; here, one device with the compiled depthwise kernel vs
one device with the pure-JAX "shifted" one (same batch, only the order of the
weight-gradient sums differs) measured 3.3e-7, 2.0e-5, 2.1e-4 at steps 1-3.
So against the one-device reference, step 1 (one step of rounding) must agree
to 1e-5 and later steps to 1e-3; a real error (a wrong batch split, a lost
gradient) shows at step 1 already.
The two-process job trains 2 steps, stops, and is started again to step 3, so
its final parameters also went through an orbax save and restore done by both
processes together.

Compared at steps 1, 2 and 3 (parameters and BatchNorm statistics):
  one process, one device          the reference (one sum over all 16 rows)
  one process, two fake devices    data parallel in one process
  two processes, one device each   multi-host: gloo all-reduce over loopback
The last two split the batch the same way (8 + 8 rows, then a sum of two
partial results, which is exact whichever order it is added in), so they must
be bit-identical; against the reference they differ by float32 summation
order only.
"""
import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from tests.conftest import REPO
from tlflax import distributed
from tlflax.pretrained.load import flatten

CONFIG = textwrap.dedent("""
    import ml_collections
    from tlflax.config import base_config

    def get_config():
      c = base_config()
      c.model.pretrained = False
      c.model.kwargs = ml_collections.ConfigDict({"width_mult": 0.25})
      c.model.bn_mode = "train"
      c.data.name = "digits"
      c.data.image_size = 32
      c.data.eval_crop = "resize"
      c.batch_size = 16
      c.eval_batch_size = 128
      c.total_steps = 3
      c.eval_every_steps = 100
      c.checkpoint_every_steps = 1
      c.keep_checkpoints = 3
      c.log_every_steps = 1
      c.optim.lr = 0.01
      c.optim.schedule = "constant"
      c.optim.rules = [(r"backbone/features_([0-9]|1[0-3])/.*", "frozen"), (".*", 1.0)]
      return c
""")
TIMEOUT = 900  # Seconds per launch; the machine running the tests may be busy.
STEPS = 3


def gloo_missing() -> str:
  from jax._src.lib import _jax  # pylint: disable=g-import-not-at-top
  if not hasattr(_jax, "make_gloo_tcp_collectives"):
    return "this jaxlib has no gloo CPU collectives (make_gloo_tcp_collectives)"
  return ""


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def start(config_file, workdir, log, *overrides, extra_env=None):
  env = {k: v for k, v in os.environ.items()
         if k != "XLA_FLAGS" and not k.startswith(("SLURM_", "OMPI_", "TLFLAX_COORDINATOR",
                                                   "TLFLAX_NUM_PROCESSES", "TLFLAX_PROCESS_ID",
                                                   "TLFLAX_DISTRIBUTED", "JAX_COORDINATOR"))}
  env.update(JAX_PLATFORMS="cpu", **(extra_env or {}))
  out = open(log, "w")
  proc = subprocess.Popen(
      [sys.executable, "-m", "tlflax.main", "--config", str(config_file), "--workdir",
       str(workdir), *overrides], cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
  return proc, out, log


def wait_all(started):
  """Waits for every process; on a failure or timeout kills the rest and shows the logs."""
  failed = []
  for proc, out, log in started:
    try:
      rc = proc.wait(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
      rc = "timeout"
    out.close()
    if rc != 0:
      failed.append((log, rc))
  if failed:
    for proc, _, _ in started:
      if proc.poll() is None:
        proc.kill()
        proc.wait()
    tails = "\n".join(f"--- {log} (exit {rc}):\n{Path(log).read_text()[-3000:]}"
                      for log, rc in failed)
    pytest.fail(f"tlflax.main failed:\n{tails}")


def two_processes(config_file, workdir, logs, *overrides):
  port = free_port()
  return [start(config_file, workdir, logs / f"{workdir.name}_{i}_{len(overrides)}.log",
                *overrides, extra_env={"TLFLAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
                                       "TLFLAX_NUM_PROCESSES": "2", "TLFLAX_PROCESS_ID": str(i)})
          for i in range(2)]


def saved_state(workdir: Path, step: int):
  """Parameters and statistics of a checkpoint, read onto this process's one device.

  A checkpoint saved by two processes records their two-device topology, so the
  target placement is given explicitly.
  """
  path = workdir / "checkpoints" / str(step) / "default"
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  is_array = lambda x: hasattr(x, "shape")  # pylint: disable=unnecessary-lambda-assignment
  with ocp.StandardCheckpointer() as ckptr:
    tree = ckptr.metadata(path).item_metadata.tree
    target = jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), tree, is_leaf=is_array)
    restored = ckptr.restore(path, target)
  flat = flatten({"params": restored["params"], "model_state": restored["model_state"]})
  return {k: np.asarray(v) for k, v in flat.items()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """Workdirs of the three runs (see the module docstring)."""
  if gloo_missing():
    pytest.skip(gloo_missing())
  root = tmp_path_factory.mktemp("distributed")
  config_file = root / "tiny_digits.py"
  config_file.write_text(CONFIG)
  dirs = {name: root / name for name in ("one", "fake2", "two")}
  off = "--config.distributed.mode=off"
  wait_all([start(config_file, dirs["one"], root / "one.log", off),
            start(config_file, dirs["fake2"], root / "fake2.log", off,
                  extra_env={"XLA_FLAGS": "--xla_force_host_platform_device_count=2"})])
  wait_all(two_processes(config_file, dirs["two"], root, "--config.total_steps=2"))
  wait_all(two_processes(config_file, dirs["two"], root))  # Restores step 2, trains step 3.
  return dirs


def relative_difference(a, b, prefix=""):
  """Norm-wise ||a - b|| / ||b|| over every tensor whose path starts with `prefix`.

  Norm-wise, as every parity figure here: per tensor or per element it is
  meaningless for quantities that are rounding noise around zero, such as the
  running mean of a convolution fed by a BatchNorm output.
  """
  keys = sorted(k for k in b if k.startswith(prefix))
  assert sorted(a) == sorted(b)
  va = np.concatenate([a[k].ravel().astype(np.float64) for k in keys])
  vb = np.concatenate([b[k].ravel().astype(np.float64) for k in keys])
  return float(np.linalg.norm(va - vb) / np.linalg.norm(vb))


def differences_by_step(run, reference):
  """Relative differences (everything, parameters only) at steps 1..STEPS."""
  pairs = [(saved_state(run, s), saved_state(reference, s)) for s in range(1, STEPS + 1)]
  return ([relative_difference(a, b) for a, b in pairs],
          [relative_difference(a, b, "params/") for a, b in pairs])


def assert_rounding_only(everything, label):
  """Step 1 within float32 rounding; later steps within the net's amplification of it."""
  print(f"{label}: relative difference at steps 1-{STEPS} (parameters and BatchNorm "
        f"statistics): {', '.join(f'{d:.2e}' for d in everything)}")
  assert everything[0] <= 1e-5
  assert max(everything) <= 1e-3


def test_two_processes_match_one_process(runs):
  info = json.loads((runs["two"] / "run_info.json").read_text())
  assert info["effective"]["process_count"] == 2 and info["effective"]["device_count"] == 2
  assert info["effective"]["local_batch_size"] == 8  # Each process reads half the batch.
  everything, _ = differences_by_step(runs["two"], runs["one"])
  assert_rounding_only(everything, "two processes vs one process")
  two, first = saved_state(runs["two"], STEPS), saved_state(runs["two"], 1)
  assert relative_difference(two, first, "params/") > 1e-4  # The steps really trained.
  # Metrics: written once, by process 0; eval over every val image once.
  summary = json.loads((runs["two"] / "summary.json").read_text())
  reference = json.loads((runs["one"] / "summary.json").read_text())
  assert summary["eval/num_examples"] == reference["eval/num_examples"] == 360
  assert abs(summary["eval/loss"] - reference["eval/loss"]) <= 1e-4
  lines = (runs["two"] / "metrics.jsonl").read_text().splitlines()
  assert [json.loads(l)["step"] for l in lines] == [2, STEPS]  # The end of each launch.


def test_two_processes_equal_two_local_devices_bit_for_bit(runs):
  """Same split of the batch (8 + 8), same reductions: identical bits at every step."""
  for step in range(1, STEPS + 1):
    two, fake2 = saved_state(runs["two"], step), saved_state(runs["fake2"], step)
    different = [k for k in fake2 if two[k].tobytes() != fake2[k].tobytes()]
    print(f"step {step}: two processes vs two local devices: {len(different)} of {len(fake2)} "
          "tensors differ")
    assert not different, different[:5]


def test_two_local_devices_match_one_device(runs):
  everything, _ = differences_by_step(runs["fake2"], runs["one"])
  assert_rounding_only(everything, "two local devices vs one")


# Settings: config first, then TLFLAX_* variables, then JAX's own detection.

def test_single_process_when_nothing_is_set():
  opts = distributed.settings(distributed.default_config(), environ={})
  assert distributed.wanted(opts, environ={}) is None
  assert distributed.initialize(distributed.default_config(), environ={}) is False


def test_environment_variables_and_config_precedence():
  env = {"TLFLAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "TLFLAX_NUM_PROCESSES": "4",
         "TLFLAX_PROCESS_ID": "3", "TLFLAX_LOCAL_DEVICE_IDS": "0,1"}
  config = distributed.default_config()
  opts = distributed.settings(config, env)
  assert (opts["coordinator_address"], opts["num_processes"], opts["process_id"],
          opts["local_device_ids"]) == ("10.0.0.1:1234", 4, 3, [0, 1])
  assert distributed.wanted(opts, env) == "coordinator 10.0.0.1:1234"
  config.process_id = 1
  assert distributed.settings(config, env)["process_id"] == 1
  assert distributed.wanted(distributed.settings(config, dict(env, TLFLAX_DISTRIBUTED="off")),
                            env) is None
  jax_env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.2:99"}
  opts = distributed.settings(None, jax_env)
  assert distributed.wanted(opts, jax_env) == "coordinator 10.0.0.2:99"


@pytest.mark.parametrize("env,expected", [
    ({"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n[1-2]", "SLURM_PROCID": "0",
      "SLURM_LOCALID": "0", "SLURM_NTASKS": "2"}, "slurm"),
    # The batch script itself, or a one-task step: one process, no coordinator.
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "2"}, None),
    ({"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n1", "SLURM_PROCID": "0",
      "SLURM_LOCALID": "0", "SLURM_NTASKS": "1"}, None),
    ({"OMPI_COMM_WORLD_SIZE": "4"}, "ompi"),
    ({"TPU_WORKER_HOSTNAMES": "w0,w1"}, "tpu"),
    ({"TPU_WORKER_HOSTNAMES": "w0"}, None),
])
def test_cluster_detection(env, expected):
  assert distributed.cluster_in_environment(env) == expected


def test_bad_values_name_the_setting():
  with pytest.raises(ValueError, match="TLFLAX_NUM_PROCESSES='two'"):
    distributed.settings(None, {"TLFLAX_NUM_PROCESSES": "two"})
  with pytest.raises(ValueError, match="TLFLAX_DISTRIBUTED.*auto, on, off"):
    distributed.settings(None, {"TLFLAX_DISTRIBUTED": "yes"})


AGREE = textwrap.dedent("""
    import os, sys
    from tlflax import distributed
    assert distributed.initialize()
    import jax
    mine = os.environ["TLFLAX_PROCESS_ID"] == "1"  # Only process 1 "got the signal".
    from tlflax import sharding
    import numpy as np
    rows = np.arange(4, dtype=np.float32).reshape(2, 2) + 10 * jax.process_index()
    batch = sharding.put_batch({"x": rows}, sharding.batch_sharding(sharding.make_mesh()))
    whole = distributed.host_copy(batch)["x"]  # Rows of both processes, in process order.
    print("RESULT", jax.process_index(), jax.process_count(), distributed.any_process(mine),
          distributed.any_process(False), whole.shape, whole[:, 0].tolist(), flush=True)
    jax.distributed.shutdown()
""")


def test_any_process_and_host_copy_across_two_processes(tmp_path):
  """A flag raised on one process only is seen by both (how a signal must end the loop);
  a batch split across processes is read whole on each (detection eval)."""
  if gloo_missing():
    pytest.skip(gloo_missing())
  port = free_port()
  procs = []
  for i in range(2):
    env = dict(os.environ, JAX_PLATFORMS="cpu", TLFLAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
               TLFLAX_NUM_PROCESSES="2", TLFLAX_PROCESS_ID=str(i))
    procs.append(subprocess.Popen([sys.executable, "-c", AGREE], cwd=REPO, env=env, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
  outputs = []
  for proc in procs:
    try:
      outputs.append(proc.communicate(timeout=300)[0])
    except subprocess.TimeoutExpired:
      for p in procs:
        p.kill()
      pytest.fail("two-process start-up on 127.0.0.1 timed out")
  results = sorted(l.split(" ", 1)[1] for out in outputs for l in out.splitlines()
                   if l.startswith("RESULT"))
  gathered = "(4, 2) [0.0, 2.0, 10.0, 12.0]"
  assert results == [f"0 2 True False {gathered}", f"1 2 True False {gathered}"], outputs


DETECTION = textwrap.dedent("""
    import ml_collections
    from tlflax.config import load_config_file

    def get_config():
      c = load_config_file({config!r})
      c.data.root = {root!r}
      c.model.pretrained = False
      c.model.kwargs = ml_collections.ConfigDict({{"width_mult": 0.25}})
      c.detection.fpn_channels = 16
      c.detection.score_threshold = 0.0
      c.data.image_size, c.data.max_boxes = 128, 4
      c.batch_size, c.eval_batch_size = 4, 20
      c.total_steps = c.eval_every_steps = 2
      c.optim.schedule, c.optim.warmup_steps = "constant", 0
      return c
""")


@pytest.mark.slow
def test_two_process_detection_eval_sees_every_image(tmp_path):
  """Detection's eval gathers boxes on the host (COCOeval): with the batch split across
  processes each one reads the whole batch (`distributed.host_copy`). Measured: AP, AP50 and
  6000 detections identical to one process; parameters 8e-8 apart."""
  if gloo_missing():
    pytest.skip(gloo_missing())
  from tests.conftest import shared_data  # pylint: disable=g-import-not-at-top
  config_file = tmp_path / "det.py"
  config_file.write_text(DETECTION.format(
      config=str(REPO / "configs" / "pets_detection.py") + ":retinanet",
      root=str(shared_data("oxford_pets_subset"))))
  wait_all([start(config_file, tmp_path / "one", tmp_path / "one.log",
                  "--config.distributed.mode=off")]
           + two_processes(config_file, tmp_path / "two", tmp_path))
  one, two = (json.loads((tmp_path / d / "summary.json").read_text()) for d in ("one", "two"))
  assert two["eval/num_examples"] == one["eval/num_examples"] == 60
  assert two["eval/num_detections"] == one["eval/num_detections"] > 0
  assert abs(two["eval/AP50"] - one["eval/AP50"]) <= 1e-3
  assert relative_difference(saved_state(tmp_path / "two", 2),
                             saved_state(tmp_path / "one", 2)) <= 1e-5
