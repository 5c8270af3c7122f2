"""Every shipped config's train step, tlflax's compiled CPU kernels on vs off, per ISA level.

Not a test. For each config in `CONFIGS` it builds what `tlflax.train.run`
builds (data pipeline on the real files in ../shared/data, model with its
pretrained weights, optimizer rules, BatchNorm freezing, the task's loss), takes
one real training batch, and times the jitted train step twice, traced once
with the kernels ("ffi" for dense conv weight gradient, depthwise, max pool)
and once with their pure-JAX fallbacks ("gemm", "shifted", "lax"), interleaved
round by round. A kernel is only allowed to be a default (`tlflax.ops.kernels.
DEFAULT_LEVELS`) at an ISA level where "on" is not slower than "off" for every
row here.

`--isa LEVEL` runs the kernels at that level (`kernels.set_isa`) and, unless
`--xla_isa` says otherwise, caps XLA's own code at the matching ISA
(`--xla_cpu_max_isa`), so an AVX-512 machine stands in for an AVX2 one: both
sides then use 256-bit vectors. (XLA's precompiled Eigen/oneDNN convolutions
keep their own dispatch, so "off" may still use wider vectors than a real AVX2
machine has: a conservative comparison for the kernels.)

  python benchmarks/shipped_configs.py [--isa avx2] [--repeats 5] [--json OUT]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
XLA_ISA = {"avx512": "AVX512", "avx2": "AVX2", "baseline": "SSE4_2"}
CONFIGS = [  # (row name, config spec): every shipped config's default and its variants.
    ("quickstart", "configs/quickstart.py"),
    ("hymenoptera linear", "configs/hymenoptera.py:linear"),
    ("hymenoptera full", "configs/hymenoptera.py:full"),
    ("seg unet", "configs/pets_segmentation.py:unet"),
    ("seg deeplabv3", "configs/pets_segmentation.py:deeplabv3"),
    ("seg fcn", "configs/pets_segmentation.py:fcn"),
    ("seg unet lite0", "configs/pets_segmentation.py:efficientnet_lite0"),
    ("det retinanet", "configs/pets_detection.py:retinanet"),
    ("det fcos", "configs/pets_detection.py:fcos"),
]
KERNELS_ON = {"TLFLAX_CONV_WGRAD_IMPL": "ffi", "TLFLAX_DEPTHWISE_IMPL": "ffi",
              "TLFLAX_MAX_POOL_IMPL": "ffi"}
KERNELS_OFF = {"TLFLAX_CONV_WGRAD_IMPL": "gemm", "TLFLAX_DEPTHWISE_IMPL": "shifted",
               "TLFLAX_MAX_POOL_IMPL": "lax"}


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--isa", default=None, help="kernel ISA level (default: the CPU's best)")
  p.add_argument("--xla_isa", default=None, help="XLA's --xla_cpu_max_isa (default: matches --isa)")
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--only", default="", help="comma-separated row names")
  p.add_argument("--json", default=None, help="write the rows here")
  return p.parse_args(argv)


def configure(args):
  """XLA flags must be set before jax starts; returns the XLA ISA cap used."""
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  xla_isa = args.xla_isa or (XLA_ISA[args.isa] if args.isa else None)
  if xla_isa:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_cpu_max_isa={xla_isa}").strip()
  sys.path.insert(0, ROOT)
  os.chdir(ROOT)
  from tlflax import xla_env  # pylint: disable=import-outside-toplevel
  xla_env.configure()
  return xla_isa


def build(spec):
  """The config's train step ingredients and one real batch, as tlflax.train.run builds them."""
  import jax  # pylint: disable=import-outside-toplevel
  from tlflax import config as config_lib, data, optim, steps, tasks, train  # pylint: disable=import-outside-toplevel
  config = config_lib.load_config_file(spec)
  pp = train.preprocessing(config)
  pipe = data.build(config.data, batch_size=config.batch_size,
                    eval_batch_size=config.eval_batch_size, seed=config.seed,
                    mean=pp["mean"], std=pp["std"])
  num_steps = train.total_steps(config, pipe.steps_per_epoch)
  module, variables = train.build_model(config, len(pipe.class_names), num_steps)
  tx, labels, _ = optim.make(config.optim, variables["params"], num_steps,
                             model_name=config.model.name)
  task = tasks.make(config, module=module, pipe=pipe)
  batch = jax.device_put(next(iter(pipe.train_batches())))
  make = lambda: jax.jit(steps.make_train_step(module, tx, labels, seed=config.seed, task=task,
                                               mixup=config.get("mixup")))
  return config, make, steps.create_state(variables, tx), batch


def traced(make, env, state, batch):
  """A train step compiled with the implementation choice in `env` (read at trace time)."""
  old = {k: os.environ.get(k) for k in env}
  os.environ.update(env)
  try:
    return make().lower(state, batch).compile()
  finally:
    for k, v in old.items():
      os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


def time_row(spec, repeats):
  import jax  # pylint: disable=import-outside-toplevel
  config, make, state, batch = build(spec)
  fns = {"on": traced(make, KERNELS_ON, state, batch), "off": traced(make, KERNELS_OFF, state, batch)}
  for fn in fns.values():
    jax.block_until_ready(fn(state, batch))
  times = {k: [] for k in fns}
  for r in range(repeats):
    for k in (("on", "off") if r % 2 == 0 else ("off", "on")):
      start = time.perf_counter()
      jax.block_until_ready(fns[k](state, batch))
      times[k].append(time.perf_counter() - start)
  med = {k: statistics.median(v) for k, v in times.items()}
  return {"batch": int(config.batch_size), "on_s": med["on"], "off_s": med["off"],
          "speedup": med["off"] / med["on"]}


def cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      return next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
  except (OSError, StopIteration):
    return platform.processor()


def main(argv=None):
  args = parse_args(argv)
  xla_isa = configure(args)
  from tlflax.ops import kernels  # pylint: disable=import-outside-toplevel
  if args.isa:
    kernels.set_isa(args.isa)
  only = set(filter(None, args.only.split(",")))
  head = {"cpu": cpu_model(), "cores": os.cpu_count(), "kernel_isa": kernels.isa(),
          "supported_isa": kernels.supported_isa(), "xla_max_isa": xla_isa or "default",
          "repeats": args.repeats, "date": time.strftime("%Y-%m-%d"), "rows": {}}
  print(f"# {head['cpu']}, {head['cores']} cores; kernels at {head['kernel_isa']} (CPU "
        f"{head['supported_isa']}), XLA max ISA {head['xla_max_isa']}; medians of "
        f"{args.repeats} train steps, s", flush=True)
  print(f"{'config':20s} {'batch':>5s} {'on':>8s} {'off':>8s} {'off/on':>7s}", flush=True)
  for name, spec in CONFIGS:
    if only and name not in only:
      continue
    row = time_row(spec, args.repeats)
    head["rows"][name] = dict(row, config=spec)
    print(f"{name:20s} {row['batch']:5d} {row['on_s']:8.3f} {row['off_s']:8.3f} "
          f"{row['speedup']:7.2f}", flush=True)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(head, f, indent=1)


if __name__ == "__main__":
  main()
