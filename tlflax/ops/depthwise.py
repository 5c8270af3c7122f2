"""Depthwise 2-D convolution with a fast CPU path.

XLA's CPU backend runs grouped convolutions slowly, and their weight gradient
(emitted with `batch_group_count=C`) is rewritten into a dense C x C
convolution. The "shifted" implementation writes the convolution as a sum over
the kh*kw kernel taps of strided slices of the padded input times one weight
per channel: elementwise work that XLA fuses into single loops. A
`jax.custom_vjp` keeps the gradients in the same form: the input gradient as
the stride-phase transpose, the weight gradient as one multi-output reduction,
both in one loop over batch chunks that stay in cache. Dilation (atrous
convolution, DeepLab's output stride) moves kernel tap (i, j) to input offset
(i * dh, j * dw); nothing else changes. Arithmetic is float32
whatever the input dtype (bf16 in, bf16 out). GPU and TPU keep
`lax.conv_general_dilated` ("lax"). Measurements: benchmarks/depthwise_layer.py.

The "ffi" implementation calls tlflax's compiled CPU kernels (`kernels.py`,
`csrc/cpu_kernels.cc`): the forward, input gradient and weight gradient as
channel-vectorized loops over output rows on XLA's thread pool. It is the CPU
default wherever the kernels were built, "shifted" where they were not.
"""
from __future__ import annotations


import jax
import jax.numpy as jnp
from jax import lax

from tlflax.ops import kernels, platform

IMPLS = ("lax", "shifted", "ffi")
ENV_VAR = "TLFLAX_DEPTHWISE_IMPL"

# Bytes of input per batch chunk in the loops below: about one or two L2 caches.
# 1-4 MiB measured within noise of each other (benchmarks/depthwise_layer.py); a
# single image larger than this is still one chunk. Read at trace time.
_CHUNK_BYTES = 2 << 20


def default_impl() -> str:
  """`TLFLAX_DEPTHWISE_IMPL` if set, else on CPU "ffi" (or "shifted" where the kernels
  were not built or are not the default at this ISA level, `kernels.default_on`), and
  "lax" elsewhere."""
  return platform.choose_impl(ENV_VAR, IMPLS,
                              "ffi" if kernels.default_on("depthwise") else "shifted")


def depthwise_conv2d(x, kernel, *, strides=(1, 1), padding=((1, 1), (1, 1)), dilation=(1, 1),
                     impl=None):
  """NHWC depthwise conv; `kernel` is (kh, kw, 1, C) as flax's nn.Conv with groups=C.

  `padding` is explicit ((top, bottom), (left, right)) and may be asymmetric.
  `dilation` is the kernel (rhs) dilation: tap (i, j) reads input offset
  (i * dh, j * dw), as `nn.Conv(kernel_dilation=...)` and torch's `dilation`.
  The output has the dtype of `x`; the "shifted" path accumulates in float32.
  """
  strides, padding, dilation = _normalize(x, kernel, strides, padding, dilation)
  impl = impl or default_impl()
  if impl == "ffi" and kernel.shape[0] * kernel.shape[1] > 49:
    impl = "shifted"  # The compiled kernels take up to 7x7 taps.
  if impl == "lax":
    return _lax_conv(x, kernel.astype(x.dtype), strides, padding, dilation)
  if impl == "shifted":
    return _shifted(x, kernel, strides, padding, dilation)
  if impl == "ffi":
    return _ffi(x, kernel, strides, padding, dilation)
  raise ValueError(f"depthwise_conv2d: impl={impl!r}; expected one of {IMPLS} or None.")


def _pair(value):
  return (value, value) if isinstance(value, int) else tuple(int(v) for v in value)


def _normalize(x, kernel, strides, padding, dilation):
  """Checks shapes up front: a mismatch would otherwise surface as an obscure slice error."""
  if x.ndim != 4:
    raise ValueError(f"depthwise_conv2d: x must be NHWC (4-D), got shape {x.shape}.")
  channels = x.shape[-1]
  if kernel.ndim != 4 or kernel.shape[2] != 1 or kernel.shape[3] != channels:
    raise ValueError(f"depthwise_conv2d: kernel must be (kh, kw, 1, C={channels}) for x of "
                     f"shape {x.shape}, got {kernel.shape}.")
  strides, dilation = _pair(strides), _pair(dilation)
  padding = tuple((int(lo), int(hi)) for lo, hi in padding)
  if len(strides) != 2 or min(strides) < 1 or len(padding) != 2:
    raise ValueError(f"depthwise_conv2d: bad strides {strides} or padding {padding}.")
  if len(dilation) != 2 or min(dilation) < 1:
    raise ValueError(f"depthwise_conv2d: dilation must be two integers >= 1, got {dilation}.")
  for size, (lo, hi), k, d in zip(x.shape[1:3], padding, kernel.shape[:2], dilation):
    if min(lo, hi) < 0 or size + lo + hi < _extent(k, d):
      raise ValueError(f"depthwise_conv2d: padding {padding} too small for input "
                       f"{x.shape}, kernel {kernel.shape} and dilation {dilation}.")
  return strides, padding, dilation


def _extent(k, d):
  """Input rows a kernel of k taps spans at dilation d."""
  return (k - 1) * d + 1


def _lax_conv(x, kernel, strides, padding, dilation):
  return lax.conv_general_dilated(
      x, kernel, window_strides=strides, padding=padding, rhs_dilation=dilation,
      dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=x.shape[-1])


def _out_size(size, lo, hi, k, s):
  return (size + lo + hi - k) // s + 1


def _tap(xp, i, j, out_h, out_w, strides):
  """The padded-input window at offset (i, j) (a kernel tap's offset, dilation included)
  that the tap multiplies, for every output pixel."""
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
  """`_tap`'s window at offset (i, j) as pad(strided slice of x): fuses into consumers,
  no padded copy."""
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


def _pad_fused(kernel, strides):
  """Whether the forward fuses the padding into its taps (see `_forward`)."""
  return max(strides) > 1 and kernel.shape[0] * kernel.shape[1] <= 9


def _forward(x, kernel, strides, padding, dilation):
  """Sum over taps of shifted input times per-channel weight, accumulated in f32.

  Stride 1 (and 5x5 kernels) read the taps from an explicitly padded copy:
  slices of it fuse into one loop without bounds checks. For 3x3 at stride 2
  the padded copy is 4x the output and costs more than it saves, so each tap is
  pad(strided slice of x) and XLA fuses the padding too (2x faster there).
  """
  kh, kw = kernel.shape[:2]
  dh, dw = dilation
  out_h = _out_size(x.shape[1], *padding[0], _extent(kh, dh), strides[0])
  out_w = _out_size(x.shape[2], *padding[1], _extent(kw, dw), strides[1])
  k = kernel.astype(jnp.float32)
  if _pad_fused(kernel, strides):
    tap = lambda i, j: _tap_unpadded(x, i, j, out_h, out_w, strides, padding)
  else:
    xp = _pad(x, padding)
    tap = lambda i, j: _tap(xp, i, j, out_h, out_w, strides)
  y = None
  for i in range(kh):
    for j in range(kw):
      term = tap(i * dh, j * dw).astype(jnp.float32) * k[i, j, 0]
      y = term if y is None else y + term
  return y.astype(x.dtype)


def _input_grad(dy, kernel, x_shape, strides, padding, dilation):
  """Transpose of the forward, one phase per stride offset (no zero-dilated dy).

  With stride s and dilation d, padded-input row p = s*m + r only receives the
  taps i with i*d = s*t + r, from output row m - t: each of the s*s phases is a
  small stride-1 shifted sum over dy. Interior padding (a fused branch) interleaves the phases and
  negative edge padding crops the conv padding, all in one loop.
  """
  n, h, w, c = x_shape
  sh, sw = strides
  (pt, _), (pl, _) = padding
  k = kernel.astype(jnp.float32)
  rows, cols = -(-(h + pt) // sh), -(-(w + pl) // sw)  # Phase extent, in dy rows/cols.
  dx = None
  for r in range(sh):
    for q in range(sw):
      ph = _phase(dy, k, _phase_taps(k.shape[0], dilation[0], sh, r),
                  _phase_taps(k.shape[1], dilation[1], sw, q), rows, cols)
      if ph is None:
        continue
      # Phase element m lands on padded row s*m + r, i.e. on dx row s*m + r - pt.
      lo_h, lo_w = r - pt, q - pl
      hi_h, hi_w = h - (lo_h + sh * (rows - 1) + 1), w - (lo_w + sw * (cols - 1) + 1)
      term = lax.pad(ph, jnp.zeros((), ph.dtype),
                     ((0, 0, 0), (lo_h, hi_h, sh - 1), (lo_w, hi_w, sw - 1), (0, 0, 0)))
      dx = term if dx is None else dx + term
  if dx is None:  # Kernel smaller than the stride: some inputs are never read.
    return jnp.zeros(x_shape, dy.dtype)
  return dx.astype(dy.dtype)


def _phase_taps(k, d, s, r):
  """(shift t, tap i) of the taps of one axis whose offset i*d lands on phase r: i*d = s*t + r."""
  return [(i * d // s, i) for i in range(k) if i * d % s == r]


def _phase(dy, k, row_taps, col_taps, rows, cols):
  """dxp[s*m + r, s*m' + q] = sum over the phase's taps of dy[m - t, m' - u] * k[i, j], in f32."""
  if not row_taps or not col_taps:
    return None
  n, out_h, out_w, c = dy.shape
  top = max(t for t, _ in row_taps)  # Pad dy so that m - t is in range for m < rows.
  left = max(u for u, _ in col_taps)
  dyp = lax.pad(dy, jnp.zeros((), dy.dtype),
                ((0, 0, 0), (top, rows - out_h, 0), (left, cols - out_w, 0), (0, 0, 0)))
  acc = None
  for t, i in row_taps:
    for u, j in col_taps:
      win = lax.slice(dyp, (0, top - t, left - u, 0), (n, top - t + rows, left - u + cols, c))
      term = win.astype(jnp.float32) * k[i, j, 0]
      acc = term if acc is None else acc + term
  return acc


def _weight_grad(x, dy, kh, kw, strides, padding, dilation):
  """Per-tap sums over (n, h, w) of shifted padded input times dy, in f32: (kh*kw, C).

  One variadic reduce computes all kh*kw sums in a single pass over x and dy
  (nine separate reductions read both nine times: 2-3x slower). The barrier
  keeps the padded copy materialized, which measured ~20% faster than fusing
  the padding into the reduction.
  """
  out_h, out_w = dy.shape[1:3]
  xp = lax.optimization_barrier(_pad(x, padding))
  dyf = dy.astype(jnp.float32)
  dh, dw = dilation
  prods = tuple(_tap(xp, i * dh, j * dw, out_h, out_w, strides).astype(jnp.float32) * dyf
                for i in range(kh) for j in range(kw))
  zeros = tuple(jnp.zeros((), jnp.float32) for _ in prods)
  sums = lax.reduce(prods, zeros, lambda a, b: tuple(u + v for u, v in zip(a, b)), (0, 1, 2))
  return jnp.stack(sums)


def _chunk_size(x):
  """Images per loop step: as many as fit `_CHUNK_BYTES` of float32, at least one."""
  per_image = x.shape[1] * x.shape[2] * x.shape[3] * 4
  return max(1, min(x.shape[0], _CHUNK_BYTES // per_image))


def _batch_loop(block, arrays, out_shapes, acc_shape, chunk):
  """Applies `block` to batch chunks of `arrays`; writes its outputs in place, sums its acc.

  A chunk of a few images stays in cache while all taps are applied to it. A
  batch not divisible by `chunk` ends with one smaller chunk, outside the loop.
  """
  n = arrays[0].shape[0]
  steps = n // chunk

  def run(outs, acc, start, size):
    parts = [lax.dynamic_slice_in_dim(a, start, size, 0) for a in arrays]
    new_outs, part = block(*parts)
    outs = tuple(lax.dynamic_update_slice_in_dim(o, u, start, 0) for o, u in zip(outs, new_outs))
    return outs, acc + part

  carry = (tuple(jnp.zeros(s.shape, s.dtype) for s in out_shapes),
           jnp.zeros(acc_shape, jnp.float32))
  carry = lax.fori_loop(0, steps, lambda b, c: run(*c, b * chunk, chunk), carry)
  if n % chunk:
    carry = run(*carry, steps * chunk, n % chunk)
  return carry


def _chunked_forward(x, kernel, strides, padding, dilation):
  """The forward over batch chunks (the padded chunk stays in cache).

  The fused-padding form has no padded copy to keep in cache, and inside the
  loop XLA fuses the chunk's dynamic slice into it, which measured 4x slower.
  """
  forward = lambda a: _forward(a, kernel, strides, padding, dilation)
  chunk = _chunk_size(x)
  if chunk >= x.shape[0] or _pad_fused(kernel, strides):
    return forward(x)
  block = lambda xc: ((forward(xc),), 0.0)
  out = jax.eval_shape(forward, x)
  (y,), _ = _batch_loop(block, (x,), (out,), (), chunk)
  return y


def _backward(x, kernel, dy, strides, padding, dilation):
  """Both gradients in one loop over batch chunks, so x and dy are read from memory once."""
  kh, kw = kernel.shape[:2]

  def block(xc, dyc):
    dxc = _input_grad(dyc, kernel, xc.shape, strides, padding, dilation).astype(x.dtype)
    return (dxc,), _weight_grad(xc, dyc, kh, kw, strides, padding, dilation)

  chunk = _chunk_size(x)
  if chunk >= x.shape[0]:
    (dx,), dk = block(x, dy)
  else:
    out = jax.ShapeDtypeStruct(x.shape, x.dtype)
    (dx,), dk = _batch_loop(block, (x, dy), (out,), (kh * kw, x.shape[-1]), chunk)
  return dx, dk.reshape(kernel.shape).astype(kernel.dtype)


def _make_op(forward, backward):
  """custom_vjp with strides/padding/dilation as static (non-differentiable) arguments.

  Residuals are just x and the kernel: the backward recomputes what it needs
  (the shifted path its padded chunks, in cache) instead of keeping a padded
  copy of x alive in memory.
  """

  def f(strides, padding, dilation, x, kernel):
    return forward(x, kernel, strides, padding, dilation)

  def fwd(strides, padding, dilation, x, kernel):
    return f(strides, padding, dilation, x, kernel), (x, kernel)

  def bwd(strides, padding, dilation, res, dy):
    x, kernel = res
    return backward(x, kernel, dy, strides, padding, dilation)

  op = jax.custom_vjp(f, nondiff_argnums=(0, 1, 2))
  op.defvjp(fwd, bwd)
  return lambda x, kernel, strides, padding, dilation: op(strides, padding, dilation, x, kernel)


_shifted = _make_op(_chunked_forward, _backward)


def _ffi_attrs(strides, padding, dilation):
  return dict(stride_h=strides[0], stride_w=strides[1], pad_top=padding[0][0],
              pad_left=padding[1][0], dilation_h=dilation[0], dilation_w=dilation[1])


def _ffi_forward(x, kernel, strides, padding, dilation):
  kh, kw, _, c = kernel.shape
  out_h = _out_size(x.shape[1], *padding[0], _extent(kh, dilation[0]), strides[0])
  out_w = _out_size(x.shape[2], *padding[1], _extent(kw, dilation[1]), strides[1])
  out = jax.ShapeDtypeStruct((x.shape[0], out_h, out_w, c), jnp.float32)
  y = kernels.call("tlflax_depthwise_forward", out, x.astype(jnp.float32),
                   kernel.reshape(kh, kw, c).astype(jnp.float32),
                   **_ffi_attrs(strides, padding, dilation))
  return y.astype(x.dtype)


def _ffi_backward(x, kernel, dy, strides, padding, dilation):
  kh, kw, _, c = kernel.shape
  attrs = _ffi_attrs(strides, padding, dilation)
  dy32 = dy.astype(jnp.float32)
  dx = kernels.call("tlflax_depthwise_input_grad", jax.ShapeDtypeStruct(x.shape, jnp.float32),
                    dy32, kernel.reshape(kh, kw, c).astype(jnp.float32), **attrs)
  dk = kernels.call("tlflax_depthwise_weight_grad", jax.ShapeDtypeStruct((kh, kw, c), jnp.float32),
                    x.astype(jnp.float32), dy32, **attrs)
  return dx.astype(x.dtype), dk.reshape(kernel.shape).astype(kernel.dtype)


_ffi = _make_op(_ffi_forward, _ffi_backward)
