"""Convolution whose 1x1 weight gradient is a GEMM on CPU.

XLA's CPU backend expresses the weight gradient of a convolution as another
convolution with batch and features swapped (activation as (C, H, W, N), the
output gradient as the kernel), and layout assignment materialises both
operands transposed before Eigen runs it: two full transposes of
activation-sized tensors per layer. For a 1x1 kernel the weight gradient is
one matrix product instead, dW = X^T G with X the (strided) input as
(N*H*W, Ci) and G the output gradient as (N*H*W, Co), both already row-major
in NHWC. In a training step the transposes (fused with the recomputed BN/ReLU
that produces X) were 55% of ResNet-50's step at 224 px and 14% of
MobileNetV2's (benchmarks/README.md, "Per-op account of the remaining gap").
Larger kernels keep XLA's gradient: as one GEMM per tap over strided slices
it measured slower for ResNet-18's 3x3 convolutions (same section).

Larger kernels (3x3, 7x7) get the same treatment from tlflax's compiled CPU
kernel (`kernels.py`, "ffi"): register-tiled outer products over the NHWC rows,
no transposes.

`conv_general_dilated` is a drop-in for `lax.conv_general_dilated` (flax's
`nn.Conv(conv_general_dilated=...)`): ungrouped, undilated NHWC/HWIO
convolutions with explicit padding go through a `jax.custom_vjp` whose
forward and input gradient are lax's own and whose weight gradient is the
GEMM (1x1) or the kernel (larger, output channels a multiple of 16, "ffi"
only); every other convolution is lax's, unchanged. The impl is chosen per
platform: "ffi" on CPU where the kernels were built, else "gemm"; "lax"
elsewhere. `TLFLAX_CONV_WGRAD_IMPL=lax|gemm|ffi` overrides it (read at trace time).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from tlflax.ops import kernels, platform

IMPLS = ("lax", "gemm", "ffi")
ENV_VAR = "TLFLAX_CONV_WGRAD_IMPL"
_NHWC = ((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2))  # lhs, rhs, out specs of NHWC/HWIO/NHWC.


def default_impl() -> str:
  """`TLFLAX_CONV_WGRAD_IMPL` if set, else on CPU "ffi" (or "gemm" where the kernels were
  not built or are not the default at this ISA level, `kernels.default_on`), and "lax"
  elsewhere."""
  return platform.choose_impl(ENV_VAR, IMPLS,
                              "ffi" if kernels.default_on("conv") else "gemm")


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                         batch_group_count=1, precision=None, preferred_element_type=None):
  """`lax.conv_general_dilated`, with the GEMM or kernel weight gradient where it applies."""
  impl = default_impl()
  if impl != "lax" and _is_plain_nhwc(
      lhs, rhs, padding, lhs_dilation, rhs_dilation, dimension_numbers, feature_group_count,
      batch_group_count, preferred_element_type):
    pointwise = tuple(rhs.shape[:2]) == (1, 1)
    if pointwise or (impl == "ffi" and rhs.shape[3] % 16 == 0):
      pads = tuple((int(lo), int(hi)) for lo, hi in padding)
      wgrad = "gemm" if pointwise else "ffi"
      return _wgrad_op(tuple(int(s) for s in window_strides), pads, precision, wgrad)(lhs, rhs)
  return lax.conv_general_dilated(
      lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
      dimension_numbers=dimension_numbers, feature_group_count=feature_group_count,
      batch_group_count=batch_group_count, precision=precision,
      preferred_element_type=preferred_element_type)


def _is_plain_nhwc(lhs, rhs, padding, lhs_dilation, rhs_dilation, dimension_numbers,
                   feature_group_count, batch_group_count, preferred_element_type) -> bool:
  """NHWC/HWIO, no groups, no dilation, explicit padding, plain output dtype."""
  if (lhs.ndim != 4 or rhs.ndim != 4 or feature_group_count != 1 or batch_group_count != 1 or isinstance(padding, str)
      or preferred_element_type is not None or dimension_numbers is None):
    return False
  if any(d != 1 for d in tuple(lhs_dilation or (1, 1)) + tuple(rhs_dilation or (1, 1))):
    return False
  spec = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
  return (tuple(spec.lhs_spec), tuple(spec.rhs_spec), tuple(spec.out_spec)) == _NHWC


def _forward(x, kernel, strides, padding, precision):
  return lax.conv_general_dilated(x, kernel, strides, padding, precision=precision,
                                  dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _weight_grad(x, dy, kernel_shape, strides, padding, precision):
  """dW[i, j] = X_ij^T dY over (N, H, W), one GEMM per kernel tap (i, j) (one for 1x1)."""
  (pt, pb), (pl, pr) = padding
  if pt or pb or pl or pr:
    x = jnp.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
  kh, kw, ci, co = kernel_shape
  n, ho, wo, _ = dy.shape
  sh, sw = strides
  dy2 = dy.reshape(-1, co)

  def tap(i, j):
    xs = x
    if (i, j, sh, sw) != (0, 0, 1, 1) or x.shape[1:3] != (ho, wo):
      xs = lax.slice(x, (0, i, j, 0), (n, i + (ho - 1) * sh + 1, j + (wo - 1) * sw + 1, ci),
                     (1, sh, sw, 1))
    return lax.dot_general(xs.reshape(-1, ci), dy2, (((0,), (0,)), ((), ())),
                           precision=precision, preferred_element_type=jnp.float32)

  return jnp.stack([jnp.stack([tap(i, j) for j in range(kw)]) for i in range(kh)])


def _conv_attrs(strides, top, left):
  return dict(stride_h=strides[0], stride_w=strides[1], pad_top=top, pad_left=left,
              dilation_h=1, dilation_w=1)


def _kernel_taps_ok(kernel):
  """The compiled forward handles up to 7x7 taps; larger kernels keep lax's forward."""
  return kernel.shape[0] * kernel.shape[1] <= 49


def _kernel_forward(x, kernel, strides, padding):
  """The compiled kernel's forward (float32 inside, x's dtype out)."""
  (pt, pb), (pl, pr) = padding
  kh, kw, _, co = kernel.shape
  out_h = (x.shape[1] + pt + pb - kh) // strides[0] + 1
  out_w = (x.shape[2] + pl + pr - kw) // strides[1] + 1
  y = kernels.call("tlflax_conv_forward",
                   jax.ShapeDtypeStruct((x.shape[0], out_h, out_w, co), jnp.float32),
                   x.astype(jnp.float32), kernel.astype(jnp.float32),
                   **_conv_attrs(strides, pt, pl))
  return y.astype(x.dtype)


def _kernel_input_grad(dy, kernel, x_shape, padding):
  """Stride 1: dx is dy convolved with the flipped, transposed kernel (same compiled forward)."""
  (pt, _), (pl, _) = padding
  kh, kw = kernel.shape[:2]
  flipped = jnp.flip(kernel, (0, 1)).transpose(0, 1, 3, 2).astype(jnp.float32)
  return kernels.call("tlflax_conv_forward", jax.ShapeDtypeStruct(x_shape, jnp.float32),
                      dy.astype(jnp.float32), flipped,
                      **_conv_attrs((1, 1), kh - 1 - pt, kw - 1 - pl))


def _kernel_weight_grad(x, dy, kernel_shape, strides, padding):
  """The compiled kernel's dW (float32), any kernel size; output channels a multiple of 16."""
  return kernels.call("tlflax_conv_weight_grad", jax.ShapeDtypeStruct(kernel_shape, jnp.float32),
                      x.astype(jnp.float32), dy.astype(jnp.float32),
                      **_conv_attrs(strides, padding[0][0], padding[1][0]))


@functools.lru_cache(maxsize=None)
def _wgrad_op(strides, padding, precision, wgrad):
  """One custom_vjp per static configuration; `wgrad` is "gemm" or "ffi".

  "gemm" (1x1): lax's forward and input gradient, the GEMM weight gradient.
  "ffi" (larger kernels): the compiled weight gradient, the compiled forward (from 16
  input channels), and the input gradient as a compiled forward at stride 1 (lax's
  otherwise).
  """

  def forward(x, kernel):
    # Below 16 input channels (a network's first convolution) the kernel's tiles are
    # mostly pointer set-up; Eigen's convolution measured faster there.
    if wgrad == "ffi" and x.shape[3] >= 16 and _kernel_taps_ok(kernel):
      return _kernel_forward(x, kernel, strides, padding)
    return _forward(x, kernel, strides, padding, precision)

  @jax.custom_vjp
  def op(x, kernel):
    return forward(x, kernel)

  def fwd(x, kernel):
    return op(x, kernel), (x, kernel)

  def bwd(res, dy):
    x, kernel = res
    if wgrad == "ffi":
      if strides == (1, 1) and x.shape[3] % 16 == 0 and _kernel_taps_ok(kernel):
        dx = _kernel_input_grad(dy, kernel, x.shape, padding).astype(x.dtype)
      else:
        dx = jax.vjp(lambda x_: _forward(x_, kernel, strides, padding, precision), x)[1](dy)[0]
      dw = _kernel_weight_grad(x, dy, kernel.shape, strides, padding)
    else:
      dx = jax.vjp(lambda x_: _forward(x_, kernel, strides, padding, precision), x)[1](dy)[0]
      dw = _weight_grad(x, dy, kernel.shape, strides, padding, precision)
    return dx, dw.astype(kernel.dtype)

  op.defvjp(fwd, bwd)
  return op
