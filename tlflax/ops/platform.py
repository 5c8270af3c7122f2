"""Choosing an op's implementation per platform, overridable by an environment variable.

The CPU-specific formulations (`depthwise.py`'s shifted taps, `conv.py`'s GEMM
weight gradient) win on XLA's CPU backend only; elsewhere lax's own op is kept.
The variable is read at trace time, so a test or benchmark can switch it.
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterator, Sequence

import jax


def choose_impl(env_var: str, impls: Sequence[str], cpu_impl: str, other_impl: str = "lax") -> str:
  """`env_var` if set (one of `impls`), else `cpu_impl` on CPU and `other_impl` elsewhere."""
  impl = os.environ.get(env_var)
  if impl:
    if impl not in impls:
      raise ValueError(f"{env_var}={impl!r}; expected one of {tuple(impls)}.")
    return impl
  return cpu_impl if jax.default_backend() == "cpu" else other_impl


@contextlib.contextmanager
def lax_ops() -> Iterator[None]:
  """Within it, every per-platform op (depthwise, convolution, max pool) traces as lax's own.

  For what must not hold a CPU-only choice: `jax.export` artifacts (the compiled
  kernels are custom calls it cannot serialize; the shifted depthwise needs a
  concrete batch) and FLOP counts (XLA's cost analysis does not see inside a
  custom call). Restores the caller's settings on exit.
  """
  from tlflax.ops import conv, depthwise, pooling  # pylint: disable=import-outside-toplevel
  names = (conv.ENV_VAR, depthwise.ENV_VAR, pooling.ENV_VAR)
  before = {name: os.environ.get(name) for name in names}
  os.environ.update({name: "lax" for name in names})
  try:
    yield
  finally:
    for name, value in before.items():
      if value is None:
        os.environ.pop(name, None)
      else:
        os.environ[name] = value
