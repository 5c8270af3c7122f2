"""Times ResNet-18's dense convolution layers: lax vs tlflax's compiled CPU kernel.

Not a test. For each layer (batch 32, 224 px shapes) the forward (lax's
convolution vs the kernel's implicit GEMM) and the weight gradient (the vjp
with `TLFLAX_CONV_WGRAD_IMPL=lax` vs `ffi`), interleaved round by round;
medians in ms and GFLOP/s. Set XLA_FLAGS as tlflax.main does to compare
against the Eigen convolution it uses. `TLFLAX_CPU_ISA=avx2` (with
`XLA_FLAGS=--xla_cpu_max_isa=AVX2` for XLA's side) times the AVX2 build on an
AVX-512 machine.

  python benchmarks/conv_layer.py [--batch 32] [--repeats 5]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from tlflax import xla_env  # noqa: E402

xla_env.configure()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax import lax  # noqa: E402

from tlflax.ops import conv  # noqa: E402

DN = ("NHWC", "HWIO", "NHWC")
LAYERS = [  # (name, input H=W, kernel (kh, kw, ci, co), strides, padding)
    ("stem 7x7 3->64 s2", 224, (7, 7, 3, 64), (2, 2), ((3, 3), (3, 3))),
    ("layer1 3x3 64", 56, (3, 3, 64, 64), (1, 1), ((1, 1), (1, 1))),
    ("layer2 3x3 128", 28, (3, 3, 128, 128), (1, 1), ((1, 1), (1, 1))),
    ("layer3 3x3 256", 14, (3, 3, 256, 256), (1, 1), ((1, 1), (1, 1))),
    ("layer4 3x3 512", 7, (3, 3, 512, 512), (1, 1), ((1, 1), (1, 1))),
    ("3x3 64->128 s2", 56, (3, 3, 64, 128), (2, 2), ((1, 1), (1, 1))),
]


def weight_grad_fn(impl, strides, padding, *args):
  """The compiled vjp w.r.t. the kernel, traced (and so choosing `impl`) right here."""
  os.environ[conv.ENV_VAR] = impl
  f = lambda x, w: conv.conv_general_dilated(x, w, strides, padding, dimension_numbers=DN)
  return jax.jit(lambda x, w, dy: jax.vjp(lambda w_: f(x, w_), w)[1](dy)[0]).lower(
      *args).compile()


def time_layer(batch, size, shape, strides, padding, repeats):
  x = jnp.full((batch, size, size, shape[2]), 0.5, jnp.float32)
  w = jnp.full(shape, 0.1, jnp.float32)
  y = jax.eval_shape(lambda: lax.conv_general_dilated(x, w, strides, padding,
                                                      dimension_numbers=DN))
  dy = jnp.ones(y.shape, jnp.float32)
  fns = {
      "fwd lax": (jax.jit(lambda x, w: lax.conv_general_dilated(
          x, w, strides, padding, dimension_numbers=DN)), (x, w)),
      "fwd ffi": (jax.jit(lambda x, w: conv._kernel_forward(  # pylint: disable=protected-access
          x, w, strides, padding)), (x, w)),
      "dW lax": (weight_grad_fn("lax", strides, padding, x, w, dy), (x, w, dy)),
      "dW ffi": (weight_grad_fn("ffi", strides, padding, x, w, dy), (x, w, dy)),
  }
  for fn, args in fns.values():
    jax.block_until_ready(fn(*args))
  times = {k: [] for k in fns}
  for _ in range(repeats):
    for k, (fn, args) in fns.items():
      start = time.perf_counter()
      jax.block_until_ready(fn(*args))
      times[k].append(time.perf_counter() - start)
  flops = 2 * y.shape[0] * y.shape[1] * y.shape[2] * y.shape[3] * shape[0] * shape[1] * shape[2]
  return {k: statistics.median(v) for k, v in times.items()}, flops


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--repeats", type=int, default=5)
  args = p.parse_args()
  from tlflax.ops import kernels  # pylint: disable=import-outside-toplevel
  print(f"# medians of {args.repeats}, batch {args.batch}, ms (GFLOP/s); load "
        f"{os.getloadavg()[0]:.2f}; XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}; kernels at "
        f"{kernels.isa()} (TLFLAX_CPU_ISA; CPU {kernels.supported_isa()})")
  print(f"{'layer':22s}" + "".join(f"{k:>18s}" for k in ("fwd lax", "fwd ffi", "dW lax", "dW ffi")))
  for name, size, shape, strides, padding in LAYERS:
    medians, flops = time_layer(args.batch, size, shape, strides, padding, args.repeats)
    print(f"{name:22s}" + "".join(f"{1e3 * t:9.1f} ({flops / t / 1e9:4.0f})"
                                  for t in medians.values()))


if __name__ == "__main__":
  main()
