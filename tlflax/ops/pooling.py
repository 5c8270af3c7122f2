"""Max pooling with a fast CPU path.

XLA's CPU backend computes a max pool's gradient with select-and-scatter, which
re-reads every window and is several times slower than torch's argmax scatter
(in ResNet-18's train step at 224 px it was ~15% of the step; benchmarks/README.md).
The "ffi" implementation calls tlflax's compiled CPU kernels (`kernels.py`): the
forward also records, per output, which window tap held the maximum (one byte),
and the backward adds dy onto that tap. Ties go to the first maximum in
row-major window order and NaN propagates, as with lax. It is the CPU default
where the kernels were built; "lax" (flax's `nn.max_pool`) everywhere else.
"""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from tlflax.ops import kernels, platform

IMPLS = ("lax", "ffi")
ENV_VAR = "TLFLAX_MAX_POOL_IMPL"


def default_impl() -> str:
  """`TLFLAX_MAX_POOL_IMPL` if set, else "ffi" on CPU where the kernels were built and are
  the default at this ISA level (`kernels.default_on`), else "lax"."""
  return platform.choose_impl(ENV_VAR, IMPLS, "ffi" if kernels.default_on("max_pool") else "lax")


def max_pool(x, window: Sequence[int], strides: Sequence[int], padding="VALID", impl=None):
  """NHWC max pool; `padding` is "VALID" or ((top, bottom), (left, right)), padded with -inf.

  Same arguments and result as `flax.linen.max_pool` for 4-D inputs.
  """
  window, strides = tuple(int(v) for v in window), tuple(int(v) for v in strides)
  if padding == "VALID":
    padding = ((0, 0), (0, 0))
  if isinstance(padding, str) or x.ndim != 4 or len(window) != 2 or len(strides) != 2:
    raise ValueError(f"max_pool: expected NHWC x, a 2-D window and strides, and 'VALID' or "
                     f"explicit ((top, bottom), (left, right)) padding; got x {x.shape}, "
                     f"window {window}, strides {strides}, padding {padding!r}.")
  padding = tuple((int(lo), int(hi)) for lo, hi in padding)
  impl = impl or default_impl()
  if impl == "lax":
    return nn.max_pool(x, window, strides, padding=padding)
  if impl == "ffi":
    return _ffi(x, window, strides, padding)
  raise ValueError(f"max_pool: impl={impl!r}; expected one of {IMPLS} or None.")


def _attrs(window, strides, padding):
  return dict(window_h=window[0], window_w=window[1], stride_h=strides[0], stride_w=strides[1],
              pad_top=padding[0][0], pad_left=padding[1][0])


def _out_shape(x, window, strides, padding, dtype):
  n, h, w, c = x.shape
  oh, ow = ((size + lo + hi - k) // s + 1
            for size, (lo, hi), k, s in zip((h, w), padding, window, strides))
  return jax.ShapeDtypeStruct((n, oh, ow, c), dtype)


def _make_ffi_op():
  """custom_vjp: the forward keeps the argmax taps (uint8) as the only residual.

  `x_shape` is static so the backward knows the input's shape (the output size
  alone does not determine it under floor rounding).
  """

  def f(window, strides, padding, x_shape, x):
    y = kernels.call("tlflax_max_pool", _out_shape(x, window, strides, padding, jnp.float32),
                     x.astype(jnp.float32), **_attrs(window, strides, padding))
    return y.astype(x.dtype)

  def fwd(window, strides, padding, x_shape, x):
    shape = _out_shape(x, window, strides, padding, jnp.float32)
    y, index = kernels.call("tlflax_max_pool_with_index",
                            (shape, jax.ShapeDtypeStruct(shape.shape, jnp.uint8)),
                            x.astype(jnp.float32), **_attrs(window, strides, padding))
    return y.astype(x.dtype), index

  def bwd(window, strides, padding, x_shape, index, dy):
    dx = kernels.call("tlflax_max_pool_grad", jax.ShapeDtypeStruct(x_shape, jnp.float32),
                      dy.astype(jnp.float32), index, **_attrs(window, strides, padding))
    return (dx.astype(dy.dtype),)

  op = jax.custom_vjp(f, nondiff_argnums=(0, 1, 2, 3))
  op.defvjp(fwd, bwd)
  return lambda x, window, strides, padding: op(window, strides, padding, x.shape, x)


_ffi = _make_ffi_op()
