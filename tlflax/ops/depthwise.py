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
_CONFIG = {"fwd": "pad", "fwd_chunk_bytes": 2 << 20, "bwd_chunk_bytes": 2 << 20,
           "dx": "loop_phase", "wgrad_sum": "variadic", "wgrad_barrier": True}


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


def _window(size, lo, k, s, out):
  """For one axis and tap offset k: (start, count, before, after) such that the tap's
  window of the padded input equals `before` zeros, x[start::s][:count], `after` zeros."""
  first = max(0, -(-(lo - k) // s))  # First output index whose input index >= 0.
  last = min(out - 1, (size - 1 + lo - k) // s)  # Last one whose input index < size.
  count = max(0, last - first + 1)
  return s * first + k - lo, count, first, out - first - count


def _tap_unpadded(x, i, j, out_h, out_w, strides, padding):
  """Tap (i, j)'s window as pad(strided slice of x): fuses into consumers, no padded copy."""
  n, h, w, c = x.shape
  sh, sw = strides
  h0, hn, hb, ha = _window(h, padding[0][0], i, sh, out_h)
  w0, wn, wb, wa = _window(w, padding[1][0], j, sw, out_w)
  if hn == 0 or wn == 0:
    return jnp.zeros((n, out_h, out_w, c), x.dtype)
  win = lax.slice(x, (0, h0, w0, 0), (n, h0 + sh * (hn - 1) + 1, w0 + sw * (wn - 1) + 1, c),
                  (1, sh, sw, 1))
  return lax.pad(win, jnp.zeros((), x.dtype), ((0, 0, 0), (hb, ha, 0), (wb, wa, 0), (0, 0, 0)))


def _pad(x, padding):
  (t, b), (l, r) = padding
  return lax.pad(x, jnp.zeros((), x.dtype), ((0, 0, 0), (t, b, 0), (l, r, 0), (0, 0, 0)))


def _forward(x, kernel, strides, padding, pad_mode):
  """Sum over taps of shifted input times per-channel weight, accumulated in f32."""
  kh, kw = kernel.shape[:2]
  out_h = _out_size(x.shape[1], *padding[0], kh, strides[0])
  out_w = _out_size(x.shape[2], *padding[1], kw, strides[1])
  k = kernel.astype(jnp.float32)
  if pad_mode == "flat" and strides[1] == 1:
    return _forward_flat(x, kernel, strides, padding, out_h, out_w)
  if pad_mode == "fused":
    tap = lambda i, j: _tap_unpadded(x, i, j, out_h, out_w, strides, padding)
  else:
    xp = _pad(x, padding)
    tap = lambda i, j: _tap(xp, i, j, out_h, out_w, strides)
  y = None
  for i in range(kh):
    for j in range(kw):
      term = tap(i, j).astype(jnp.float32) * k[i, j, 0]
      y = term if y is None else y + term
  return y.astype(x.dtype)


def _forward_flat(x, kernel, strides, padding, out_h, out_w):
  """Stride-1-in-w forward on (n, h, w*c) rows: long contiguous minor dim for XLA's loops."""
  n, c = x.shape[0], x.shape[-1]
  kh, kw = kernel.shape[:2]
  sh = strides[0]
  xp = _pad(x, padding)
  xp = xp.reshape(n, xp.shape[1], xp.shape[2] * c)
  k = kernel.astype(jnp.float32)
  y = None
  for i in range(kh):
    for j in range(kw):
      win = lax.slice(xp, (0, i, j * c), (n, i + sh * (out_h - 1) + 1, (j + out_w) * c), (1, sh, 1))
      term = win.astype(jnp.float32) * jnp.tile(k[i, j, 0], out_w)
      y = term if y is None else y + term
  return y.reshape(n, out_h, out_w, c).astype(x.dtype)


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


def _input_grad_pad(dy, kernel, x_shape, strides, padding):
  """Like `_input_grad`, but interleaves the phases with interior padding (no stack)."""
  n, h, w, c = x_shape
  sh, sw = strides
  (pt, _), (pl, _) = padding
  k = kernel.astype(jnp.float32)
  rows = -(-(h + pt) // sh)
  cols = -(-(w + pl) // sw)
  dx = None
  for r in range(sh):
    for q in range(sw):
      ph = _phase(dy, k, r, q, rows, cols, strides)
      # Phase element m sits at padded row s*m + r, i.e. dx row s*m + r - pt.
      lo_h, lo_w = r - pt, q - pl
      hi_h = h - (lo_h + sh * (rows - 1) + 1)
      hi_w = w - (lo_w + sw * (cols - 1) + 1)
      term = lax.pad(ph, jnp.zeros((), ph.dtype),
                     ((0, 0, 0), (lo_h, hi_h, sh - 1), (lo_w, hi_w, sw - 1), (0, 0, 0)))
      dx = term if dx is None else dx + term
  return dx.astype(dy.dtype)


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


def _wgrad_block(xc, dy, kh, kw, strides, padding):
  """Per-tap sums over (n, h, w) of shifted padded input times dy, in f32: (kh*kw, C)."""
  out_h, out_w = dy.shape[1:3]
  xp = _pad(xc, padding)
  if _CONFIG["wgrad_barrier"]:
    xp = lax.optimization_barrier(xp)
  dyf = dy.astype(jnp.float32)
  prods = [_tap(xp, i, j, out_h, out_w, strides).astype(jnp.float32) * dyf
           for i in range(kh) for j in range(kw)]
  mode = _CONFIG["wgrad_sum"]
  if mode == "variadic":
    zeros = tuple(jnp.zeros((), jnp.float32) for _ in prods)
    sums = lax.reduce(tuple(prods), zeros, lambda a, b: tuple(u + v for u, v in zip(a, b)),
                      (0, 1, 2))
  elif mode == "dot":
    ones = jnp.ones((dy.shape[0] * out_h * out_w,), jnp.float32)
    sums = [jnp.dot(ones, p.reshape(ones.shape[0], -1), precision=lax.Precision.HIGHEST)
            for p in prods]
  else:
    sums = [jnp.sum(p, axis=(0, 1, 2)) for p in prods]
  return jnp.stack(sums)


def _dx(dy, kernel, x_shape, strides, padding, mode):
  if mode == "vjp":
    x0 = jnp.zeros(x_shape, dy.dtype)
    return jax.vjp(lambda a: _forward(a, kernel, strides, padding, "pad"), x0)[1](dy)[0]
  if mode == "pad":
    return _input_grad_pad(dy, kernel, x_shape, strides, padding)
  return _input_grad(dy, kernel, x_shape, strides, padding)


def _chunk_size(n, image_bytes, target):
  """Largest divisor of n whose chunk of images takes at most `target` bytes (>= 1)."""
  return max(b for b in range(1, n + 1) if n % b == 0 and (b == 1 or b * image_bytes <= target))


def _image_bytes(x):
  return x.shape[1] * x.shape[2] * x.shape[3] * 4


def _batch_loop(n, chunk, arrays, block, out_shapes, acc_shape):
  """Runs `block` over batch chunks; maps outputs (DUS into full arrays), sums `acc`."""
  def body(b, carry):
    outs, acc = carry
    start = b * chunk
    parts = tuple(lax.dynamic_slice_in_dim(a, start, chunk, 0) for a in arrays)
    new_outs, part_acc = block(*parts)
    outs = tuple(lax.dynamic_update_slice_in_dim(o, u, start, 0) for o, u in zip(outs, new_outs))
    return outs, (acc if part_acc is None else acc + part_acc)

  init = (tuple(jnp.zeros(s.shape, s.dtype) for s in out_shapes),
          jnp.zeros(acc_shape, jnp.float32))
  return lax.fori_loop(0, n // chunk, body, init)


def _chunked_forward(x, kernel, strides, padding):
  """Forward over batch chunks so the padded chunk and its taps stay in cache."""
  n = x.shape[0]
  mode = _CONFIG["fwd"]
  if isinstance(mode, dict):
    mode = mode[strides[0]]
  chunk = _chunk_size(n, _image_bytes(x), _CONFIG["fwd_chunk_bytes"])
  if mode == "fused" or chunk == n:
    return _forward(x, kernel, strides, padding, mode)
  fwd = lambda xc: ((_forward(xc, kernel, strides, padding, mode),), None)
  out = jax.eval_shape(lambda a: fwd(a)[0][0], x)
  (y,), _ = _batch_loop(n, chunk, (x,), fwd, (out,), ())
  return y


def _backward(x, kernel, dy, strides, padding):
  """Both gradients, the weight one as a loop over batch chunks read once from memory.

  Summing the weight gradient over the whole batch at once streams x and dy
  from memory once per tap; a chunk of a few images stays in cache for all
  kh*kw taps (and, with dx="loop", for the input gradient). Padding happens per chunk.
  """
  kh, kw = kernel.shape[:2]
  n, c = x.shape[0], x.shape[-1]
  chunk = _chunk_size(n, _image_bytes(x), _CONFIG["bwd_chunk_bytes"])
  dx_mode = _CONFIG["dx"]
  if isinstance(dx_mode, dict):
    dx_mode = dx_mode[(kh, strides[0])]
  in_loop = dx_mode.startswith("loop")

  def block(xc, dyc):
    dk = _wgrad_block(xc, dyc, kh, kw, strides, padding)
    if in_loop:
      dxc = _dx(dyc, kernel, xc.shape, strides, padding, dx_mode[5:]).astype(x.dtype)
      return (dxc,), dk
    return (), dk

  outs = (jax.ShapeDtypeStruct(x.shape, x.dtype),) if in_loop else ()
  if chunk == n:
    outs, dk = block(x, dy)
  else:
    outs, dk = _batch_loop(n, chunk, (x, dy), block, outs, (kh * kw, c))
  dx = outs[0] if in_loop else _dx(dy, kernel, x.shape, strides, padding, dx_mode).astype(x.dtype)
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
