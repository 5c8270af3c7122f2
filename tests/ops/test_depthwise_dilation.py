"""Dilated (atrous) depthwise convolution: both impls equal lax.conv_general_dilated.

The reference here is `lax.conv_general_dilated(rhs_dilation=...)` called
directly, so the "lax" impl is checked too, not only "shifted" against "lax".
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from tlflax.ops import depthwise, kernels
from tlflax.ops.depthwise import depthwise_conv2d

TOL = 1e-5

CASES = [  # (x shape, kernel size, strides, padding, dilation)
    ((5, 9, 9, 4), 3, (1, 1), ((2, 2), (2, 2)), (2, 2)),  # DeepLab: size kept
    ((5, 9, 10, 4), 3, (1, 1), ((4, 4), (4, 4)), (4, 4)),  # taps beyond the map
    ((5, 8, 9, 4), 3, (1, 1), ((2, 2), (3, 3)), (2, 3)),  # different per axis
    ((5, 10, 9, 4), 3, (2, 2), ((2, 2), (2, 2)), (2, 2)),  # stride 2: the fused-pad path
    ((5, 11, 10, 4), 3, (2, 2), ((3, 3), (1, 2)), (3, 3)),  # stride 2, odd dilation: phases mix
    ((5, 9, 8, 4), 5, (1, 1), ((4, 4), (4, 4)), (2, 2)),  # 5x5
    ((5, 12, 11, 4), 5, (2, 1), ((2, 5), (4, 3)), (2, 2)),  # 5x5, mixed strides, asymmetric
]


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


def _reference(x, kernel, strides, padding, dilation):
  return lax.conv_general_dilated(
      x, kernel, window_strides=strides, padding=padding, rhs_dilation=dilation,
      dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=x.shape[-1])


def _value_and_grads(conv, x, kernel, cotangent):
  @jax.jit
  def run(x, kernel):
    y, vjp = jax.vjp(conv, x, kernel)
    return (y,) + vjp(cotangent)

  with jax.default_matmul_precision("highest"):
    return run(x, kernel)


@pytest.fixture
def small_chunks(monkeypatch):
  """Chunks of about 2 images of the shapes above, so the batch loop and its tail run."""
  monkeypatch.setattr(depthwise, "_CHUNK_BYTES", 2 * 10 * 10 * 4 * 4)


@pytest.mark.parametrize("impl", ["shifted", "lax", pytest.param("ffi", marks=pytest.mark.skipif(
    not kernels.available(), reason=f"CPU kernels: {kernels.unavailable_reason()}"))])
@pytest.mark.parametrize("shape,k,strides,padding,dilation", CASES,
                         ids=[f"{c[0][1]}x{c[0][2]}-k{c[1]}-s{c[2]}-d{c[4]}" for c in CASES])
def test_dilated_matches_lax_conv(small_chunks, impl, shape, k, strides, padding, dilation):
  rng = np.random.RandomState(sum(shape) + k)
  x = jnp.asarray(rng.randn(*shape), jnp.float32)
  kernel = jnp.asarray(rng.randn(k, k, 1, shape[-1]), jnp.float32)
  reference = lambda x, w: _reference(x, w, strides, padding, dilation)
  ours = lambda x, w: depthwise_conv2d(x, w, strides=strides, padding=padding,
                                       dilation=dilation, impl=impl)
  out_shape = jax.eval_shape(reference, x, kernel).shape
  cotangent = jnp.asarray(rng.randn(*out_shape), jnp.float32)
  want = _value_and_grads(reference, x, kernel, cotangent)
  got = _value_and_grads(ours, x, kernel, cotangent)
  for name, a, b in zip(("forward", "input grad", "kernel grad"), got, want):
    assert a.shape == b.shape and a.dtype == b.dtype, name
    assert _rel(a, b) < TOL, (name, _rel(a, b))


def test_padding_d_keeps_size_and_dilation_1_is_the_default():
  """Padding (k-1)//2*d keeps the spatial size (how dilated stages keep their resolution)."""
  rng = np.random.RandomState(0)
  x = jnp.asarray(rng.randn(2, 7, 7, 3), jnp.float32)
  kernel = jnp.asarray(rng.randn(3, 3, 1, 3), jnp.float32)
  y = depthwise_conv2d(x, kernel, padding=((3, 3), (3, 3)), dilation=3, impl="shifted")
  assert y.shape == x.shape
  np.testing.assert_array_equal(depthwise_conv2d(x, kernel, dilation=(1, 1), impl="shifted"),
                                depthwise_conv2d(x, kernel, impl="shifted"))


def test_bad_dilation_is_a_clear_error():
  x, kernel = jnp.zeros((1, 6, 6, 2)), jnp.zeros((3, 3, 1, 2))
  with pytest.raises(ValueError, match="dilation must be two integers >= 1"):
    depthwise_conv2d(x, kernel, dilation=0, impl="shifted")
  # A 3x3 kernel at dilation 4 spans 9 rows: 6 + 1 + 1 is too few.
  with pytest.raises(ValueError, match=r"too small .* dilation \(4, 4\)"):
    depthwise_conv2d(x, kernel, padding=((1, 0), (1, 0)), dilation=4, impl="shifted")
