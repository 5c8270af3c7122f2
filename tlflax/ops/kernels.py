"""tlflax's XLA FFI CPU kernels: loading, registration and calls.

The kernels (`csrc/cpu_kernels.cc`: depthwise convolution and its gradients, max
pooling and its gradient) are compiled when the package is installed
(`setup.py`). They register once, for the "cpu" platform, the first time an op
asks for them. Where the extension is missing (a source tree that was never
installed, no compiler at install time) `available()` is False,
`unavailable_reason()` says why, and the ops fall back to their pure-JAX paths.
"""
from __future__ import annotations

import functools

import jax
import numpy as np

_NOT_BUILT = ("tlflax.ops._cpu_kernels is not built. Reinstall with a C++17 compiler present "
              "(`pip install -e .`, which compiles tlflax/ops/csrc/cpu_kernels.cc)")


@functools.cache
def _load() -> str | None:
  """Registers every FFI target; returns None on success, else the reason it failed."""
  try:
    from tlflax.ops import _cpu_kernels  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    return f"{_NOT_BUILT}: {e}"
  for name, capsule in _cpu_kernels.targets().items():
    jax.ffi.register_ffi_target(name, capsule, platform="cpu")
  return None


def available() -> bool:
  """Whether the compiled CPU kernels can be called."""
  return _load() is None


def unavailable_reason() -> str | None:
  return _load()


def call(target: str, out_types, *args, **attrs):
  """`jax.ffi.ffi_call` of one registered target; integer attributes go as int64."""
  reason = _load()
  if reason is not None:
    raise RuntimeError(f"CPU kernel {target!r} unavailable: {reason}.")
  attrs = {k: np.int64(v) for k, v in attrs.items()}
  return jax.ffi.ffi_call(target, out_types, vmap_method="sequential")(*args, **attrs)
