"""Builds tlflax's CPU kernels (tlflax/ops/csrc) against jaxlib's XLA FFI headers.

Everything else about the package is in pyproject.toml. The extension is
optional: where it cannot be built (no C++17 compiler, no jaxlib headers) the
install still succeeds and tlflax uses its pure-JAX paths (tlflax/ops/kernels.py
says why a kernel is unavailable).
"""
import importlib.util
import os
import sys

from setuptools import Extension, setup


def _ffi_include_dir():
  """jaxlib's headers (`jax.ffi.include_dir()`), found without importing jaxlib."""
  spec = importlib.util.find_spec("jaxlib")
  if spec is None or not spec.submodule_search_locations:
    return None
  path = os.path.join(list(spec.submodule_search_locations)[0], "include")
  return path if os.path.exists(os.path.join(path, "xla", "ffi", "api", "ffi.h")) else None


def _extensions():
  include = _ffi_include_dir()
  if include is None or os.environ.get("TLFLAX_NO_CPU_KERNELS"):
    print("tlflax: not building the CPU kernels (no jaxlib FFI headers, or "
          "TLFLAX_NO_CPU_KERNELS set); the pure-JAX ops will be used.", file=sys.stderr)
    return []
  return [Extension(
      "tlflax.ops._cpu_kernels",
      sources=["tlflax/ops/csrc/cpu_kernels.cc"],
      include_dirs=[include],
      language="c++",
      extra_compile_args=["-std=c++17", "-O3", "-Wno-attributes", "-Wno-sign-compare", "-Wno-psabi"],
      optional=True,
  )]


setup(ext_modules=_extensions())
