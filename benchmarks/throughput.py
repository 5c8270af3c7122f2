"""Training and inference throughput: tlflax vs torchvision, same machine, same process.

Not a test. For each (model, resolution, mode) case it times tlflax's real
train step (`tlflax.steps.make_train_step`, jitted with donation) or its
jitted inference, and the same torchvision architecture in channels_last with
as many threads as XLA gets. Repeats of the two frameworks are interleaved
(and the order alternates), so noise from other jobs on a shared machine hits
both alike; medians are reported. Also measured once: a float32 matmul peak
(to read achieved GFLOP/s against) and the tf.data input pipeline at 224 px
(to see whether it could keep up with training).

  python benchmarks/throughput.py [--models mobilenet_v2,resnet18,resnet50]
      [--res 224,128] [--modes train,infer] [--train-batch 32] [--infer-batch 64]
      [--repeats 10] [--warmup 2] [--json results.json] [--no-torch]
      [--no-xla-flags] [--pipeline-root ../shared/data/hymenoptera]

See benchmarks/README.md for the columns and the JSON layout.
"""
from __future__ import annotations

import argparse
import gc
import importlib.metadata
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("JAX_PLATFORMS", "cpu")  # A CPU comparison: torch runs on the CPU too.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")

DEFAULT_PIPELINE_ROOT = REPO.parent / "shared" / "data" / "hymenoptera"
MATMUL_N = 2048


def log(message: str) -> None:
  """Progress goes to stderr so stdout holds only the table."""
  print(f"[throughput {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def csv(text: str, kind=str):
  return [kind(v) for v in text.split(",") if v.strip()]


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--models", default="mobilenet_v2,resnet18,resnet50")
  p.add_argument("--res", default="224,128", help="comma-separated input sizes (square)")
  p.add_argument("--modes", default="train,infer")
  p.add_argument("--train-batch", type=int, default=32)
  p.add_argument("--infer-batch", type=int, default=64)
  p.add_argument("--repeats", type=int, default=10, help="timed steps per framework and case")
  p.add_argument("--warmup", type=int, default=2, help="untimed steps after compilation")
  p.add_argument("--json", default=None, help="write results here (rewritten after each case)")
  p.add_argument("--no-torch", action="store_true", help="tlflax only; torch columns are null")
  p.add_argument("--no-xla-flags", action="store_true",
                 help="set TLFLAX_NO_XLA_FLAGS=1: measure without tlflax's extra XLA flags")
  p.add_argument("--pipeline-root", default=None,
                 help=f"image folder for the input-pipeline row (default {DEFAULT_PIPELINE_ROOT})")
  p.add_argument("--pipeline-batches", type=int, default=20)
  p.add_argument("--pipeline-warmup", type=int, default=3)
  p.add_argument("--no-pipeline", action="store_true", help="skip the input-pipeline row")
  args = p.parse_args(argv)
  args.models, args.res, args.modes = csv(args.models), csv(args.res, int), csv(args.modes)
  bad = [m for m in args.modes if m not in ("train", "infer")]
  if bad or args.repeats < 1 or args.warmup < 0:
    p.error(f"--modes takes train and/or infer (got {bad}); --repeats >= 1, --warmup >= 0.")
  return p, args


def configure_xla(no_xla_flags: bool) -> dict:
  """Same as `python -m tlflax.main`: flags go into XLA_FLAGS before JAX starts a backend."""
  if no_xla_flags:
    os.environ["TLFLAX_NO_XLA_FLAGS"] = "1"
  before = os.environ.get("XLA_FLAGS", "")
  from tlflax import xla_env  # Imports jax, but creates no backend yet.
  applied = xla_env.configure()
  return {"xla_flags": applied, "xla_flags_before_tlflax": before,
          "tlflax_no_xla_flags": os.environ.get("TLFLAX_NO_XLA_FLAGS")}


def check_models(parser, names):
  """Unknown names fail before anything is compiled, listing what exists."""
  import tlflax
  known = tlflax.list_models()
  unknown = [n for n in names if n not in known]
  if unknown:
    parser.error(f"unknown model(s) {unknown}; tlflax.list_models() has: {', '.join(known)}")


# ---------------------------------------------------------------- machine


def cpu_model() -> str:
  try:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        return line.split(":", 1)[1].strip()
  except OSError:
    pass
  import platform
  return platform.processor() or platform.machine()


def cpu_flags() -> list:
  """The SIMD features that decide which kernels XLA and torch can use."""
  try:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("flags"):
        have = set(line.split(":", 1)[1].split())
        wanted = ("avx", "avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile")
        return [f for f in wanted if f in have]
  except OSError:
    pass
  return []


def affinity() -> list:
  return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(
      range(os.cpu_count() or 1))


def version(*dists):
  for dist in dists:
    try:
      return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
      continue
  return None


def depthwise_impl() -> str:
  from tlflax.ops import depthwise
  fn = getattr(depthwise, "default_impl", None)
  return fn() if fn else "lax"


def op_impls() -> dict:
  """Which implementation each of tlflax's per-platform ops uses in this run."""
  impls = {"depthwise": depthwise_impl()}
  for name, module in (("conv", "tlflax.ops.conv"), ("max_pool", "tlflax.ops.pooling")):
    try:
      impls[name] = importlib.import_module(module).default_impl()
    except (ImportError, AttributeError):
      impls[name] = "lax"
  from tlflax.ops import kernels  # The ISA level the compiled kernels ran at (TLFLAX_CPU_ISA).
  impls["kernel_isa"] = kernels.isa() if kernels.available() else None
  return impls


def machine_info(xla: dict, torch_threads) -> dict:
  import jax
  cpus = affinity()
  return {
      "cpu_model": cpu_model(), "cpu_flags": cpu_flags(), "os_cpu_count": os.cpu_count(),
      "affinity": cpus, "affinity_count": len(cpus),
      "jax_backend": jax.default_backend(), "jax_devices": [str(d) for d in jax.devices()],
      "versions": {"python": sys.version.split()[0], "jax": version("jax"),
                   "jaxlib": version("jaxlib"), "flax": version("flax"),
                   "optax": version("optax"), "torch": version("torch"),
                   "torchvision": version("torchvision"),
                   "tensorflow": version("tensorflow", "tensorflow-cpu")},
      **xla, "depthwise_impl": depthwise_impl(), "op_impls": op_impls(),
      "threads": {"torch_intra_op": torch_threads[0] if torch_threads else None,
                  "torch_inter_op": torch_threads[1] if torch_threads else None,
                  # XLA sizes its CPU pool from the affinity mask (tsl MaxParallelism).
                  "xla_intra_op_assumed": len(cpus),
                  **{k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}},
  }


def load_average():
  """1-minute load: other jobs on the CPUs skew both frameworks, torch's OpenMP threads most."""
  try:
    return float(Path("/proc/loadavg").read_text().split()[0])
  except (OSError, ValueError, IndexError):
    return None


def warn_if_busy(where: str) -> None:
  load, cpus = load_average(), len(affinity())
  if load is not None and load > 0.5 * cpus:
    log(f"WARNING ({where}): load average {load:.2f} on {cpus} CPUs; other jobs are running, "
        "so timings (torch's especially) are not representative.")


def time_calls(fn, repeats: int, warmup: int) -> list:
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return times


def matmul_peak(repeats: int) -> dict:
  """Dense float32 GEMM rate: the ceiling to read the models' GFLOP/s against."""
  import jax
  import jax.numpy as jnp
  a = jax.random.normal(jax.random.key(0), (MATMUL_N, MATMUL_N), jnp.float32)
  b = jax.random.normal(jax.random.key(1), (MATMUL_N, MATMUL_N), jnp.float32)
  dot = jax.jit(jnp.dot)
  times = time_calls(lambda: jax.block_until_ready(dot(a, b)), repeats, warmup=2)
  median = statistics.median(times)
  return {"matmul_peak_gflops": 2 * MATMUL_N ** 3 / median / 1e9,
          "matmul_peak": {"n": MATMUL_N, "dtype": "float32", "repeats": repeats,
                          "median_ms": 1e3 * median}}


# ---------------------------------------------------------------- tlflax side


def train_config():
  """tlflax's defaults with the brief's optimizer: momentum SGD, lr 0.01, everything trained."""
  from tlflax import config
  cfg = config.base_config()
  cfg.optim.name, cfg.optim.lr = "momentum", 0.01
  cfg.optim.rules = [(".*", 1.0)]
  cfg.model.bn_mode = "train"
  return cfg


def with_bn_mode(module, bn_mode: str, labels):
  """BatchNorm freezing exactly as `tlflax.train.build_model` applies it ("train": none)."""
  from tlflax import train
  patterns = train.frozen_bn_patterns(bn_mode, labels)
  if patterns:
    module = module.clone(backbone=module.backbone.clone(frozen_bn=patterns))
  return module


def flops_of(fn, *args):
  """XLA's own count for `fn` traced with lax's ops (it does not see inside tlflax's
  compiled kernels, which are custom calls); None where the backend gives none
  (loop bodies count once)."""
  import jax
  from tlflax.ops import platform
  try:
    with platform.lax_ops():
      jax.clear_caches()  # Traces are cached without the env choice: trace afresh.
      cost = jax.jit(fn).lower(*args).compile().cost_analysis()
  except Exception:  # pylint: disable=broad-except
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  flops = (cost or {}).get("flops")
  return float(flops) if flops and flops > 0 else None


def compile_timed(fn, *args, donate: bool):
  import jax
  jitted = jax.jit(fn, donate_argnums=0) if donate else jax.jit(fn)
  start = time.perf_counter()
  compiled = jitted.lower(*args).compile()
  return compiled, time.perf_counter() - start


def tlflax_inputs(batch: int, res: int):
  import jax
  import numpy as np
  rng = np.random.default_rng(0)
  image = rng.standard_normal((batch, res, res, 3), np.float32)
  label = rng.integers(0, 1000, batch).astype(np.int32)
  return jax.device_put({"image": image, "label": label})


def tlflax_runner(name: str, mode: str, batch: int, res: int):
  """(one-step callable, compile seconds, flops per step) for tlflax."""
  import jax
  import tlflax
  from tlflax import optim, steps
  module, variables = tlflax.create_model(name, num_classes=1000)
  data = tlflax_inputs(batch, res)
  if mode == "infer":
    compiled, seconds = compile_timed(lambda v, x: module.apply(v, x, train=False),
                                      variables, data["image"], donate=False)
    return (lambda: jax.block_until_ready(compiled(variables, data["image"])),
            seconds, flops_of(lambda v, x: module.apply(v, x, train=False), variables,
                              data["image"]))
  cfg = train_config()
  tx, labels, _ = optim.make(cfg.optim, variables["params"], 1000)
  module = with_bn_mode(module, cfg.model.bn_mode, labels)
  state = [steps.create_state(variables, tx)]
  train_step = steps.make_train_step(module, tx, labels)
  compiled, seconds = compile_timed(train_step, state[0], data, donate=True)

  def step():
    state[0], metrics = compiled(state[0], data)
    jax.block_until_ready((state[0], metrics))

  # 3x the forward (backward = input + weight gradients, each about a forward): XLA's
  # count of the lax training step would include the C x C dense convolution it
  # rewrites a depthwise weight gradient into.
  forward = flops_of(lambda v, x: module.apply(v, x, train=False), variables, data["image"])
  return step, seconds, 3 * forward if forward else None


# ---------------------------------------------------------------- torch side


def setup_torch(no_torch: bool):
  """torch with as many intra-op threads as CPUs in this process's affinity mask.

  torchvision is imported here, before anything imports tensorflow: the other
  order segfaults while loading triton's native library (torchvision -> torch._dynamo
  -> triton), seen with tensorflow 2.21 and torch 2.14.
  """
  if no_torch:
    return None
  import torch
  import torchvision  # noqa: F401  pylint: disable=unused-import
  torch.set_num_threads(len(affinity()))
  return torch.get_num_threads(), torch.get_num_interop_threads()


def torch_runner(name: str, mode: str, batch: int, res: int):
  """One-step callable for the torchvision model, or None if torchvision lacks it."""
  import torch
  import torch.nn.functional as F
  import torchvision
  if name not in torchvision.models.list_models(module=torchvision.models):
    return None
  model = getattr(torchvision.models, name)(num_classes=1000)
  model = model.to(memory_format=torch.channels_last)
  gen = torch.Generator().manual_seed(0)
  x = torch.randn(batch, 3, res, res, generator=gen).contiguous(memory_format=torch.channels_last)
  y = torch.randint(0, 1000, (batch,), generator=gen)
  if mode == "infer":
    model.eval()

    def infer():
      with torch.inference_mode():
        model(x)

    return infer
  model.train()
  opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

  def train():
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)

  return train


# ---------------------------------------------------------------- one case


def interleaved(runners: dict, repeats: int, warmup: int) -> dict:
  """Seconds per step for each runner; repeats alternate, and so does who goes first."""
  for name, fn in runners.items():
    log(f"  warm-up {name} ({warmup} steps)")
    for _ in range(warmup):
      fn()
  times = {name: [] for name in runners}
  order = list(runners)
  for r in range(repeats):
    for name in (order if r % 2 == 0 else order[::-1]):
      start = time.perf_counter()
      runners[name]()
      times[name].append(time.perf_counter() - start)
  return times


def summarize(row: dict, prefix: str, times, batch: int) -> None:
  if not times:
    row.update({f"{prefix}_img_s": None, f"{prefix}_step_ms_median": None,
                f"{prefix}_step_ms": None})
    return
  median = statistics.median(times)
  row.update({f"{prefix}_img_s": batch / median, f"{prefix}_step_ms_median": 1e3 * median,
              f"{prefix}_step_ms": [round(1e3 * t, 3) for t in times]})


def run_case(model: str, mode: str, res: int, args, peak: float) -> dict:
  batch = args.train_batch if mode == "train" else args.infer_batch
  row = {"model": model, "mode": mode, "batch": batch, "res": res, "load_before": load_average()}
  log(f"{model} {mode} batch={batch} res={res}: compiling tlflax")
  step, row["compile_s"], row["flops_per_step"] = tlflax_runner(model, mode, batch, res)
  runners = {"tlflax": step}
  if not args.no_torch:
    torch_step = torch_runner(model, mode, batch, res)
    if torch_step is None:
      row["torch_note"] = "torchvision has no model of this name"
    else:
      runners["torch"] = torch_step
  times = interleaved(runners, args.repeats, args.warmup)
  row["load_after"] = load_average()
  summarize(row, "tlflax", times["tlflax"], batch)
  summarize(row, "torch", times.get("torch"), batch)
  row["ratio"] = row["tlflax_img_s"] / row["torch_img_s"] if row["torch_img_s"] else None
  flops, median_ms = row["flops_per_step"], row["tlflax_step_ms_median"]
  row["achieved_gflops"] = flops / median_ms / 1e6 if flops else None
  row["fraction_of_matmul_peak"] = row["achieved_gflops"] / peak if flops and peak else None
  torch_rate = f"{row['torch_img_s']:.1f} img/s" if row["torch_img_s"] else "-"
  log(f"  tlflax {row['tlflax_img_s']:.1f} img/s, torch {torch_rate}")
  return row


def safe_case(model: str, mode: str, res: int, args, peak: float) -> dict:
  """A failing case (e.g. out of memory) is recorded, not allowed to end a long run."""
  try:
    return run_case(model, mode, res, args, peak)
  except Exception as e:  # pylint: disable=broad-except
    log(f"  FAILED: {e!r}")
    batch = args.train_batch if mode == "train" else args.infer_batch
    return {"model": model, "mode": mode, "batch": batch, "res": res, "error": repr(e)}


# ---------------------------------------------------------------- input pipeline


def pipeline_row(args, best_train_224) -> dict:
  """Images/s of tlflax's tf.data training pipeline alone (decode, crop, flip, batch)."""
  root = Path(args.pipeline_root) if args.pipeline_root else DEFAULT_PIPELINE_ROOT
  if not root.is_dir():
    log(f"input pipeline: skipped, {root} does not exist")
    return {"skipped": f"{root} does not exist"}
  from tlflax import data
  cfg = data.default_config()
  cfg.name, cfg.root, cfg.image_size = "folder", str(root), 224
  cfg.train_crop, cfg.flip = "random_resized_crop", True
  batch = 32
  log(f"input pipeline: building on {root}")
  pipe = data.build(cfg, batch_size=batch, seed=0)
  it = pipe.train_batches()
  for _ in range(args.pipeline_warmup):
    next(it)
  start = time.perf_counter()
  for _ in range(args.pipeline_batches):
    next(it)
  img_s = args.pipeline_batches * batch / (time.perf_counter() - start)
  import tensorflow as tf
  return {"root": str(root), "res": 224, "batch": batch, "batches": args.pipeline_batches,
          "warmup_batches": args.pipeline_warmup, "num_train": pipe.num_train,
          "img_s": img_s, "best_tlflax_train_img_s_224": best_train_224,
          "ratio_to_best_train_224": img_s / best_train_224 if best_train_224 else None,
          "tf_intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads(),
          "tf_inter_op_threads": tf.config.threading.get_inter_op_parallelism_threads()}


def best_train_at(rows, res: int):
  rates = [r["tlflax_img_s"] for r in rows
           if r["mode"] == "train" and r["res"] == res and r.get("tlflax_img_s")]
  return max(rates) if rates else None


# ---------------------------------------------------------------- output


COLUMNS = [  # (header, key, format)
    ("model", "model", "{}"), ("mode", "mode", "{}"), ("batch", "batch", "{}"),
    ("res", "res", "{}"), ("tlflax img/s", "tlflax_img_s", "{:.1f}"),
    ("torch img/s", "torch_img_s", "{:.1f}"), ("ratio", "ratio", "{:.2f}"),
    ("tlflax ms", "tlflax_step_ms_median", "{:.1f}"),
    ("torch ms", "torch_step_ms_median", "{:.1f}"),
    ("compile s", "compile_s", "{:.1f}"), ("GFLOP/step", "flops_per_step", "{:.2f}"),
    ("GFLOP/s", "achieved_gflops", "{:.1f}"), ("of peak", "fraction_of_matmul_peak", "{:.0%}"),
]


def cell(row, key, fmt) -> str:
  value = row.get(key)
  if value is None:
    return "-"
  return fmt.format(value / 1e9 if key == "flops_per_step" else value)


def print_table(result: dict) -> None:
  m = result["machine"]
  print(f"# {m['cpu_model']}, {m['affinity_count']} CPUs in affinity, jax {m['versions']['jax']}, "
        f"torch {m['versions']['torch']}, "
        + ", ".join(f"{k}={v}" for k, v in m.get("op_impls",
                                                  {"depthwise": m["depthwise_impl"]}).items())
        + ", "
        f"XLA_FLAGS={m['xla_flags']!r}")
  print(f"# medians of {result['args']['repeats']} steps; matmul peak "
        f"{m['matmul_peak_gflops']:.1f} GFLOP/s (float32 {MATMUL_N}^3)")
  cells = [[h for h, _, _ in COLUMNS]] + [[cell(r, k, f) for _, k, f in COLUMNS]
                                          for r in result["cases"]]
  widths = [max(len(c[i]) for c in cells) for i in range(len(COLUMNS))]
  for line in cells:
    print("  ".join(c.rjust(w) if i > 1 else c.ljust(w)
                    for i, (c, w) in enumerate(zip(line, widths))))
  for r in result["cases"]:
    if "error" in r:
      print(f"# FAILED {r['model']} {r['mode']} res {r['res']}: {r['error']}")
    elif r.get("torch_note"):
      print(f"# {r['model']}: {r['torch_note']}")
  pipe = result.get("input_pipeline")
  if pipe and "img_s" in pipe:
    ratio = pipe["ratio_to_best_train_224"]
    print(f"# input pipeline (folder, 224 px, crop+flip, batch 32): {pipe['img_s']:.1f} img/s"
          + (f" = {ratio:.2f}x the best tlflax training rate at 224 px" if ratio else ""))
  elif pipe:
    print(f"# input pipeline: {pipe['skipped']}")


def write_json(path, result) -> None:
  if path:
    Path(path).write_text(json.dumps(result, indent=1) + "\n")


def main(argv=None):
  parser, args = parse_args(argv)
  xla = configure_xla(args.no_xla_flags)
  torch_threads = setup_torch(args.no_torch)  # Before tlflax.config pulls in tensorflow.
  check_models(parser, args.models)
  result = {"args": vars(args), "machine": machine_info(xla, torch_threads), "cases": []}
  log(f"XLA_FLAGS={xla['xla_flags']!r}; measuring the matmul peak")
  warn_if_busy("start")
  result["machine"].update(matmul_peak(max(args.repeats, 5)))
  peak = result["machine"]["matmul_peak_gflops"]
  for model in args.models:
    for res in args.res:
      for mode in args.modes:
        result["cases"].append(safe_case(model, mode, res, args, peak))
        write_json(args.json, result)
        gc.collect()  # Free the previous case's model, state and activations.
  if not args.no_pipeline:
    result["input_pipeline"] = pipeline_row(args, best_train_at(result["cases"], 224))
  warn_if_busy("end")
  write_json(args.json, result)
  print_table(result)


if __name__ == "__main__":
  import tlflax  # noqa: F401  First: its import tunes malloc (tlflax.xla_env) for both frameworks.
  main()
