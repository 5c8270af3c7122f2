"""tlflax's XLA FFI CPU kernels: loading, registration, ISA level and calls.

The kernels (`csrc/cpu_kernels.cc`: depthwise convolution and its gradients,
dense convolution forward and weight gradient, max pooling and its gradient)
are compiled when the package is installed (`setup.py`). They register once,
for the "cpu" platform, the first time an op asks for them. Where the
extension is missing (a source tree that was never installed, no compiler at
install time) `available()` is False, `unavailable_reason()` says why, and the
ops fall back to their pure-JAX paths.

Each kernel is compiled for three ISA levels (`ISA_LEVELS`) and runs at the
best the CPU has; `TLFLAX_CPU_ISA` (read at load) or `set_isa` lowers it, so
the tests and benchmarks exercise every level on a machine that has the top
one. Whether a kernel is an op's *default* depends on the level
(`default_on`): a kernel is the default only at the levels where
`benchmarks/shipped_configs.py` measured every shipped config's train step
faster with it than with the op's pure-JAX fallback.
"""
from __future__ import annotations

import functools
import os

import jax
import numpy as np

ISA_ENV_VAR = "TLFLAX_CPU_ISA"
ISA_LEVELS = ("baseline", "avx2", "avx512")  # Lowest first, as the extension names them.

# Op -> ISA levels at which its kernel is the CPU default (benchmarks/README.md, "ISA
# levels and shipped configs": every shipped config's train step at 1.07-1.33x with the
# kernels at AVX2, 1.03-1.33x at AVX-512). Baseline x86-64 (no FMA, 4-float vectors)
# measured 2.5-3x slower than XLA on 3x3 convolutions: no kernel there.
DEFAULT_LEVELS = {
    "conv": ("avx2", "avx512"),
    "depthwise": ("avx2", "avx512"),
    "max_pool": ("avx2", "avx512"),
}

_NOT_BUILT = ("tlflax.ops._cpu_kernels is not built. Reinstall with a C++17 compiler present "
              "(`pip install -e .`, which compiles tlflax/ops/csrc/cpu_kernels.cc)")


@functools.cache
def _load() -> str | None:
  """Registers every FFI target and applies `TLFLAX_CPU_ISA`; None on success, else why not."""
  try:
    from tlflax.ops import _cpu_kernels  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    return f"{_NOT_BUILT}: {e}"
  if not hasattr(_cpu_kernels, "set_isa"):
    return f"{_NOT_BUILT}: the built extension predates ISA levels; reinstall"
  for name, capsule in _cpu_kernels.targets().items():
    jax.ffi.register_ffi_target(name, capsule, platform="cpu")
  requested = os.environ.get(ISA_ENV_VAR)
  if requested:
    _set_isa(_cpu_kernels, requested, f"{ISA_ENV_VAR}={requested!r}")
  return None


def _module(what: str = "CPU kernels"):
  """The loaded extension, or a RuntimeError saying why `what` cannot run."""
  reason = _load()
  if reason is not None:
    raise RuntimeError(f"{what} unavailable: {reason}.")
  from tlflax.ops import _cpu_kernels  # pylint: disable=import-outside-toplevel
  return _cpu_kernels


def _up_to(level: str) -> tuple[str, ...]:
  """The levels from baseline through `level`."""
  return ISA_LEVELS[:ISA_LEVELS.index(level) + 1]


def _set_isa(module, level: str, what: str) -> None:
  if level not in ISA_LEVELS:
    raise ValueError(f"{what}: unknown ISA level; expected one of {ISA_LEVELS}.")
  supported = module.supported_isa()
  if level not in _up_to(supported):
    raise ValueError(f"{what}: this CPU runs at most {supported!r}; expected one of "
                     f"{_up_to(supported)}.")
  module.set_isa(level)


def available() -> bool:
  """Whether the compiled CPU kernels can be called."""
  return _load() is None


def unavailable_reason() -> str | None:
  return _load()


def isa() -> str:
  """The ISA level the kernels run at now."""
  return _module().isa()


def supported_isa() -> str:
  """The highest ISA level this CPU runs."""
  return _module().supported_isa()


def runnable_isas() -> tuple[str, ...]:
  """Every level this CPU can run, lowest first (empty where the kernels are not built)."""
  if not available():
    return ()
  return _up_to(supported_isa())


def set_isa(level: str) -> None:
  """Runs the kernels at `level` (at most `supported_isa()`) from the next call on.

  Takes effect at run time, not trace time: a compiled step switches too. For
  tests and benchmarks; users set `TLFLAX_CPU_ISA` instead.
  """
  _set_isa(_module(), level, f"set_isa({level!r})")


def default_on(op: str) -> bool:
  """Whether `op`'s kernel is its CPU default here: built, and measured faster at this level."""
  return available() and isa() in DEFAULT_LEVELS[op]


def call(target: str, out_types, *args, **attrs):
  """`jax.ffi.ffi_call` of one registered target; integer attributes go as int64."""
  _module(f"CPU kernel {target!r}")
  attrs = {k: np.int64(v) for k, v in attrs.items()}
  return jax.ffi.ffi_call(target, out_types, vmap_method="sequential")(*args, **attrs)
