"""Choosing an op's implementation per platform, overridable by an environment variable.

The CPU-specific formulations (`depthwise.py`'s shifted taps, `conv.py`'s GEMM
weight gradient) win on XLA's CPU backend only; elsewhere lax's own op is kept.
The variable is read at trace time, so a test or benchmark can switch it.
"""
from __future__ import annotations

import os
from typing import Sequence

import jax


def choose_impl(env_var: str, impls: Sequence[str], cpu_impl: str, other_impl: str = "lax") -> str:
  """`env_var` if set (one of `impls`), else `cpu_impl` on CPU and `other_impl` elsewhere."""
  impl = os.environ.get(env_var)
  if impl:
    if impl not in impls:
      raise ValueError(f"{env_var}={impl!r}; expected one of {tuple(impls)}.")
    return impl
  return cpu_impl if jax.default_backend() == "cpu" else other_impl
