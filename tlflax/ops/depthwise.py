"""Depthwise 2-D convolution with a fast CPU path.

XLA's CPU backend runs grouped convolutions slowly, and their weight gradient
(emitted with `batch_group_count=C`) is rewritten into a dense C x C
convolution. The "shifted" implementation writes the convolution as a sum over
the kh*kw kernel taps of strided slices of the padded input times one weight
per channel: plain elementwise work that XLA fuses well. It is wrapped in a
`jax.custom_vjp` so that both gradients also stay elementwise and cache-blocked.
GPU and TPU keep `lax.conv_general_dilated` ("lax").
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
from jax import lax

IMPLS = ("lax", "shifted")
ENV_VAR = "TLFLAX_DEPTHWISE_IMPL"

# Tuning knobs, read at trace time (see benchmarks/depthwise_layer.py).
_CONFIG = {"fwd_chunk_bytes": 2 << 20, "bwd_chunk_bytes": 1 << 20, "wgrad_sum": "dot"}


def default_impl() -> str:
  """`TLFLAX_DEPTHWISE_IMPL` if set, else "shifted" on CPU and "lax" elsewhere."""
  impl = os.environ.get(ENV_VAR)
  if impl:
    if impl not in IMPLS:
      raise ValueError(f"{ENV_VAR}={impl!r}; expected one of {IMPLS}.")
    return impl
  return "shifted" if jax.default_backend() == "cpu" else "lax"


def depthwise_conv2d(x, kernel, *, strides=(1, 1), padding=((1, 1), (1, 1)), impl=None):
  """NHWC depthwise conv; `kernel` is (kh, kw, 1, C) as flax's nn.Conv with groups=C.

  `padding` is explicit ((top, bottom), (left, right)) and may be asymmetric.
  The output has the dtype of `x`; the "shifted" path accumulates in float32.
  """
  strides, padding = _normalize(x, kernel, strides, padding)
  impl = impl or default_impl()
  if impl == "lax":
    return _lax_conv(x, kernel.astype(x.dtype), strides, padding)
  if impl == "shifted":
    return _shifted(x, kernel, strides, padding)
  raise ValueError(f"depthwise_conv2d: impl={impl!r}; expected one of {IMPLS} or None.")


def _normalize(x, kernel, strides, padding):
  """Checks shapes up front: a mismatch would otherwise surface as an obscure slice error."""
  if x.ndim != 4:
    raise ValueError(f"depthwise_conv2d: x must be NHWC (4-D), got shape {x.shape}.")
  channels = x.shape[-1]
  if kernel.ndim != 4 or kernel.shape[2] != 1 or kernel.shape[3] != channels:
    raise ValueError(f"depthwise_conv2d: kernel must be (kh, kw, 1, C={channels}) for x of "
                     f"shape {x.shape}, got {kernel.shape}.")
  if isinstance(strides, int):
    strides = (strides, strides)
  strides = tuple(int(s) for s in strides)
  padding = tuple((int(lo), int(hi)) for lo, hi in padding)
  if len(strides) != 2 or min(strides) < 1 or len(padding) != 2:
    raise ValueError(f"depthwise_conv2d: bad strides {strides} or padding {padding}.")
  for size, (lo, hi), k, s in zip(x.shape[1:3], padding, kernel.shape[:2], strides):
    if min(lo, hi) < 0 or size + lo + hi < k:
      raise ValueError(f"depthwise_conv2d: padding {padding} too small for input "
                       f"{x.shape} and kernel {kernel.shape}.")
  return strides, padding


def _lax_conv(x, kernel, strides, padding):
  return lax.conv_general_dilated(
      x, kernel, window_strides=strides, padding=padding,
      dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=x.shape[-1])


def _out_size(size, lo, hi, k, s):
  return (size + lo + hi - k) // s + 1


def _tap(xp, i, j, out_h, out_w, strides):
  """The input window that kernel tap (i, j) multiplies, for every output pixel."""
  sh, sw = strides
  return lax.slice(xp, (0, i, j, 0),
                   (xp.shape[0], i + sh * (out_h - 1) + 1, j + sw * (out_w - 1) + 1, xp.shape[3]),
                   (1, sh, sw, 1))


def _pad(x, padding):
  (t, b), (l, r) = padding
  return lax.pad(x, jnp.zeros((), x.dtype), ((0, 0, 0), (t, b, 0), (l, r, 0), (0, 0, 0)))


def _forward(x, kernel, strides, padding):
  """Sum over taps of shifted input times per-channel weight, accumulated in f32."""
  kh, kw = kernel.shape[:2]
  out_h = _out_size(x.shape[1], *padding[0], kh, strides[0])
  out_w = _out_size(x.shape[2], *padding[1], kw, strides[1])
  xp = _pad(x, padding)
  k = kernel.astype(jnp.float32)
  y = None
  for i in range(kh):
    for j in range(kw):
      term = _tap(xp, i, j, out_h, out_w, strides).astype(jnp.float32) * k[i, j, 0]
      y = term if y is None else y + term
  return y.astype(x.dtype)


def _input_grad(dy, kernel, x_shape, strides, padding):
  """Transpose of the forward, one output phase per stride offset (no zero-dilated dy).

  With stride s, padded-input row p = s*m + r only receives taps i = s*t + r,
  from output row m - t. Each phase is thus a small stride-1 shifted sum over
  dy; the s*s phases are interleaved and the padding cropped.
  """
  n, h, w, c = x_shape
  kh, kw = kernel.shape[:2]
  sh, sw = strides
  (pt, _), (pl, _) = padding
  out_h, out_w = dy.shape[1:3]
  k = kernel.astype(jnp.float32)
  # Rows of the padded input covered by each phase: m in [0, rows).
  rows = -(-(h + pt) // sh)
  cols = -(-(w + pl) // sw)
  phases = []
  for r in range(sh):
    row = []
    for q in range(sw):
      row.append(_phase(dy, k, r, q, rows, cols, strides))
    phases.append(jnp.stack(row, axis=3))  # (n, rows, cols, sw, c)
  full = jnp.stack(phases, axis=2)  # (n, rows, sh, cols, sw, c)
  full = full.reshape(n, rows * sh, cols * sw, c)
  return full[:, pt:pt + h, pl:pl + w, :].astype(dy.dtype)


def _phase(dy, k, r, q, rows, cols, strides):
  """dxp[s*m + r, s*m' + q] = sum_t,u dy[m - t, m' - u] * k[s*t + r, s*u + q]."""
  sh, sw = strides
  kh, kw = k.shape[:2]
  ti = range(len(range(r, kh, sh)))
  tj = range(len(range(q, kw, sw)))
  n, out_h, out_w, c = dy.shape
  if not ti or not tj:
    return jnp.zeros((n, rows, cols, c), jnp.float32)
  # Pad dy so that index m - t for m in [0, rows), t in ti is in range.
  top, left = len(ti) - 1, len(tj) - 1
  bottom, right = rows - out_h, cols - out_w
  dyp = lax.pad(dy, jnp.zeros((), dy.dtype),
                ((0, 0, 0), (top, bottom, 0), (left, right, 0), (0, 0, 0)))
  acc = None
  for t in ti:
    for u in tj:
      win = lax.slice(dyp, (0, top - t, left - u, 0), (n, top - t + rows, left - u + cols, c))
      term = win.astype(jnp.float32) * k[sh * t + r, sw * u + q, 0]
      acc = term if acc is None else acc + term
  return acc


def _wgrad_block(xp, dy, kh, kw, strides):
  """Per-tap sums over (n, h, w) of shifted padded input times dy, in f32: (kh*kw, C)."""
  out_h, out_w = dy.shape[1:3]
  dyf = dy.astype(jnp.float32)
  prods = [_tap(xp, i, j, out_h, out_w, strides).astype(jnp.float32) * dyf
           for i in range(kh) for j in range(kw)]
  if _CONFIG["wgrad_sum"] == "dot":
    ones = jnp.ones((dy.shape[0] * out_h * out_w,), jnp.float32)
    sums = [jnp.dot(ones, p.reshape(ones.shape[0], -1), precision=lax.Precision.HIGHEST)
            for p in prods]
  else:
    sums = [jnp.sum(p, axis=(0, 1, 2)) for p in prods]
  return jnp.stack(sums)


def _chunk_size(n, image_bytes, target):
  """Largest divisor of n whose chunk of images takes at most `target` bytes (>= 1)."""
  return max(b for b in range(1, n + 1) if n % b == 0 and (b == 1 or b * image_bytes <= target))


def _image_bytes(x):
  return x.shape[1] * x.shape[2] * x.shape[3] * 4


def _chunked_forward(x, kernel, strides, padding):
  """Forward over batch chunks so the padded chunk and its taps stay in cache."""
  n = x.shape[0]
  chunk = _chunk_size(n, _image_bytes(x), _CONFIG["fwd_chunk_bytes"])
  if chunk == n:
    return _forward(x, kernel, strides, padding)
  if _CONFIG.get("loop") == "scan":
    xs = x.reshape(n // chunk, chunk, *x.shape[1:])
    ys = lax.map(lambda xc: _forward(xc, kernel, strides, padding), xs)
    return ys.reshape(n, *ys.shape[2:])
  out = jax.eval_shape(lambda xc: _forward(xc, kernel, strides, padding), x)

  def body(b, y):
    start = b * chunk
    yc = _forward(lax.dynamic_slice_in_dim(x, start, chunk, 0), kernel, strides, padding)
    return lax.dynamic_update_slice_in_dim(y, yc, start, 0)

  return lax.fori_loop(0, n // chunk, body, jnp.zeros(out.shape, out.dtype))


def _backward(x, kernel, dy, strides, padding):
  """Both gradients in one loop over batch chunks: x and dy chunks are read once.

  Summing the weight gradient over the whole batch at once streams x and dy
  from memory once per tap; a chunk of a few images stays in cache for all
  kh*kw taps and for the input gradient. Padding happens per chunk.
  """
  kh, kw = kernel.shape[:2]
  n, c = x.shape[0], x.shape[-1]
  chunk = _chunk_size(n, _image_bytes(x), _CONFIG["bwd_chunk_bytes"])

  def block(xc, dyc):
    dx = _input_grad(dyc, kernel, xc.shape, strides, padding).astype(x.dtype)
    return dx, _wgrad_block(_pad(xc, padding), dyc, kh, kw, strides)

  if chunk == n:
    dx, dk = block(x, dy)
  elif _CONFIG.get("loop") == "scan":
    def body(acc, xs):
      dxc, dkc = block(*xs)
      return acc + dkc, dxc

    split = lambda a: a.reshape(n // chunk, chunk, *a.shape[1:])
    dk, dxs = lax.scan(body, jnp.zeros((kh * kw, c), jnp.float32), (split(x), split(dy)))
    dx = dxs.reshape(x.shape)
  else:
    def body(b, carry):
      dx, dk = carry
      start = b * chunk
      dxc, dkc = block(lax.dynamic_slice_in_dim(x, start, chunk, 0),
                       lax.dynamic_slice_in_dim(dy, start, chunk, 0))
      return lax.dynamic_update_slice_in_dim(dx, dxc, start, 0), dk + dkc

    init = (jnp.zeros(x.shape, x.dtype), jnp.zeros((kh * kw, c), jnp.float32))
    dx, dk = lax.fori_loop(0, n // chunk, body, init)
  return dx, dk.reshape(kh, kw, 1, c).astype(kernel.dtype)


def _shifted(x, kernel, strides, padding):
  return _shifted_op(x, kernel, strides, padding)


def _make_shifted_op():
  """custom_vjp with strides/padding as static (non-differentiable) arguments."""

  def f(strides, padding, x, kernel):
    return _chunked_forward(x, kernel, strides, padding)

  def fwd(strides, padding, x, kernel):
    return f(strides, padding, x, kernel), (x, kernel)

  def bwd(strides, padding, res, dy):
    x, kernel = res
    return _backward(x, kernel, dy, strides, padding)

  op = jax.custom_vjp(f, nondiff_argnums=(0, 1))
  op.defvjp(fwd, bwd)
  return lambda x, kernel, strides, padding: op(strides, padding, x, kernel)


_shifted_op = _make_shifted_op()
