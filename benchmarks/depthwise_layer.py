"""Times one depthwise layer: lax vs shifted (vs torch, if importable) on CPU.

Not a test. Measures forward, forward + input-grad, forward + weight-grad and
forward + both grads (what a training step needs) for a few MobileNetV2 layers. Implementations are interleaved repeat by repeat
in the same process, so a noisy shared machine slows them alike; the table
shows medians (ms) and the ratio to the shifted implementation.

  python benchmarks/depthwise_layer.py [--repeats 9] [--json out.json]
      [--impls lax,shifted,torch] [--layers 0,1,2] [--wait-quiet 10]

Set XLA_FLAGS before running to compare XLA options (separate processes).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from tlflax.ops.depthwise import depthwise_conv2d  # noqa: E402

# (name, N, H, W, C, kernel, stride, padding): MobileNetV2 at 224 px, batch 32
# (the 64x64 one is its 128 px variant), plus an EfficientNet-Lite-style 5x5.
LAYERS = [
    ("mbv2 C144 32x32 s1", 32, 32, 32, 144, 3, 1, ((1, 1), (1, 1))),
    ("mbv2 C96 64x64 s2", 32, 64, 64, 96, 3, 2, ((1, 1), (1, 1))),
    ("mbv2 C960 7x7 s1", 32, 7, 7, 960, 3, 1, ((1, 1), (1, 1))),
    ("mbv2 C32 112x112 s1", 32, 112, 112, 32, 3, 1, ((1, 1), (1, 1))),
    ("eff-lite C240 28x28 5x5 s2", 32, 28, 28, 240, 5, 2, ((1, 2), (1, 2))),
]
MODES = ("fwd", "fwd+dx", "fwd+dw", "fwd+dx+dw")


def jax_fns(impl, x, kernel, dy, stride, padding):
  """Jitted callables per mode; each returns y too, as torch's autograd computes it."""

  def f(x, k):
    return depthwise_conv2d(x, k, strides=(stride, stride), padding=padding, impl=impl)

  def with_grads(argnums):
    """y and the chosen cotangents; XLA drops what is not returned where it can.

    The barrier makes the backward wait for y, as in training where dy depends
    on y; otherwise XLA may overlap the two loops, which measured slower and noisier.
    """
    def run(x, k, dy):
      y, vjp = jax.vjp(f, x, k)
      y, dy = jax.lax.optimization_barrier((y, dy))
      grads = vjp(dy)
      return y, tuple(grads[i] for i in argnums)
    return jax.jit(run)

  fwd = jax.jit(f)
  calls = {"fwd+dx": with_grads((0,)), "fwd+dw": with_grads((1,)), "fwd+dx+dw": with_grads((0, 1))}
  fns = {"fwd": lambda: jax.block_until_ready(fwd(x, kernel))}
  fns.update({m: (lambda g=g: jax.block_until_ready(g(x, kernel, dy))) for m, g in calls.items()})
  return fns


def torch_fns(x, kernel, dy, stride, padding):
  """Same layer in torch, channels_last; asymmetric padding goes through F.pad."""
  import torch
  import torch.nn.functional as F
  (t, b), (l, r) = padding
  c = x.shape[-1]
  xt = torch.from_numpy(np.array(x)).permute(0, 3, 1, 2).contiguous(
      memory_format=torch.channels_last)
  wt = torch.from_numpy(np.array(kernel)).permute(3, 2, 0, 1).contiguous()
  dyt = torch.from_numpy(np.array(dy)).permute(0, 3, 1, 2).contiguous(
      memory_format=torch.channels_last)

  def conv(xi, wi):
    if t == b and l == r:
      return F.conv2d(xi, wi, stride=stride, padding=(t, l), groups=c)
    return F.conv2d(F.pad(xi, (l, r, t, b)), wi, stride=stride, groups=c)

  def fwd():
    with torch.no_grad():
      return conv(xt, wt)

  def grads(need_x, need_w):
    xi = xt.detach().requires_grad_(need_x)
    wi = wt.detach().requires_grad_(need_w)
    y = conv(xi, wi)
    return torch.autograd.grad(y, [v for v, need in ((xi, need_x), (wi, need_w)) if need], dyt)

  return {"fwd": fwd, "fwd+dx": lambda: grads(True, False),
          "fwd+dw": lambda: grads(False, True), "fwd+dx+dw": lambda: grads(True, True)}


def torch_available():
  """torch is imported only when its install has finished (marker in /tmp/pip3.log)."""
  try:
    with open("/tmp/pip3.log") as f:
      if not f.read().rstrip().endswith("done3"):
        return False
    import torch
    torch.set_num_threads(2)
    return True
  except (OSError, ImportError):
    return False


def _cpu_busy(seconds=0.2):
  """Fraction of all CPUs busy during `seconds` (we sleep, so: other processes)."""

  def read():
    with open("/proc/stat") as f:
      ticks = [int(v) for v in f.readline().split()[1:]]
    return sum(ticks), ticks[3] + ticks[4]

  total0, idle0 = read()
  time.sleep(seconds)
  total1, idle1 = read()
  return 1.0 - (idle1 - idle0) / max(1, total1 - total0)


def wait_quiet(max_wait, threshold=0.15):
  """On a shared machine, waits up to `max_wait` s for other jobs to go idle; True if they did."""
  deadline = time.time() + max_wait
  while time.time() < deadline:
    try:
      if _cpu_busy() < threshold:
        return True
    except OSError:
      return True
  return False


def time_layer(layer, impls, repeats, warmup, max_wait=0.0):
  """Median ms per (impl, mode), repeats interleaved across implementations."""
  name, n, h, w, c, k, s, pad = layer
  x = jax.random.normal(jax.random.PRNGKey(0), (n, h, w, c), jnp.float32)
  kernel = jax.random.normal(jax.random.PRNGKey(1), (k, k, 1, c), jnp.float32) * 0.1
  y = depthwise_conv2d(x, kernel, strides=(s, s), padding=pad, impl="shifted")
  dy = jax.random.normal(jax.random.PRNGKey(2), y.shape, jnp.float32)
  fns = {}
  for impl in impls:
    if impl == "torch":
      fns[impl] = torch_fns(x, kernel, dy, s, pad)
    else:
      fns[impl] = jax_fns(impl, x, kernel, dy, s, pad)
  times = {(impl, mode): [] for impl in impls for mode in MODES}
  for mode in MODES:
    for impl in impls:
      for _ in range(warmup):  # Includes compilation.
        fns[impl][mode]()
    for rep in range(repeats):
      order = impls[rep % len(impls):] + impls[:rep % len(impls)]  # Rotate: no first-slot bias.
      if max_wait:
        wait_quiet(max_wait)
        fns[order[-1]][mode]()  # Untimed: wakes the CPU up after the idle wait.
      for impl in order:
        start = time.perf_counter()
        fns[impl][mode]()
        times[impl, mode].append(1e3 * (time.perf_counter() - start))
  return {f"{impl}/{mode}": statistics.median(v) for (impl, mode), v in times.items()}


def print_table(results, impls):
  ref = "shifted" if "shifted" in impls else impls[0]
  header = f"{'layer':28s} {'mode':10s}" + "".join(f"{i:>10s}" for i in impls)
  header += "".join(f"{i + '/' + ref:>16s}" for i in impls if i != ref)
  print(header)
  for name, res in results.items():
    for mode in MODES:
      row = f"{name:28s} {mode:10s}" + "".join(f"{res[f'{i}/{mode}']:10.2f}" for i in impls)
      row += "".join(f"{res[f'{i}/{mode}'] / res[f'{ref}/{mode}']:16.2f}"
                     for i in impls if i != ref)
      print(row, flush=True)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=9)
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--impls", default="lax,shifted,torch")
  parser.add_argument("--layers", default=None, help="comma-separated indices into LAYERS")
  parser.add_argument("--wait-quiet", type=float, default=0.0, metavar="S",
                      help="before each repeat, wait up to S s for other processes to idle")
  parser.add_argument("--json", default=None, help="also write the results here")
  args = parser.parse_args()
  impls = [i for i in args.impls.split(",") if i != "torch" or torch_available()]
  layers = LAYERS if args.layers is None else [LAYERS[int(i)] for i in args.layers.split(",")]
  results = {}
  for layer in layers:
    results[layer[0]] = time_layer(layer, impls, args.repeats, args.warmup, args.wait_quiet)
  print(f"# medians of {args.repeats} (ms), {jax.default_backend()}, jax {jax.__version__}, "
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}, {platform.processor() or platform.machine()}")
  print_table(results, impls)
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"impls": impls, "repeats": args.repeats,
                 "xla_flags": os.environ.get("XLA_FLAGS", ""), "results": results}, f, indent=1)


if __name__ == "__main__":
  main()
