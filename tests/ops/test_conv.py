"""tlflax.ops.conv: same values and gradients as lax's convolution, and where it applies."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from jax import lax  # noqa: E402

from tlflax.ops import conv as conv_ops  # noqa: E402
from tlflax.ops import kernels  # noqa: E402

TOL = 1e-5
DN = ("NHWC", "HWIO", "NHWC")


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


def _normal(shape, seed):
  return jnp.asarray(np.random.RandomState(seed).randn(*shape), jnp.float32)


def _fwd_and_grads(conv, x, kernel, strides, padding):
  """Forward and both gradients against a fixed random cotangent, under one jit."""
  f = lambda x, k: conv(x, k, strides, padding, dimension_numbers=DN)
  dy = _normal(jax.eval_shape(f, x, kernel).shape, 7)

  @jax.jit
  def run(x, kernel, dy):
    y, vjp = jax.vjp(f, x, kernel)
    return (y,) + vjp(dy)

  with jax.default_matmul_precision("highest"):
    return run(x, kernel, dy)


def _assert_matches_lax(shape, k, cout, strides, padding):
  x, kernel = _normal(shape, 0), _normal((k, k, shape[-1], cout), 1)
  got = _fwd_and_grads(conv_ops.conv_general_dilated, x, kernel, strides, padding)
  want = _fwd_and_grads(lax.conv_general_dilated, x, kernel, strides, padding)
  for name, g, w in zip(("y", "dx", "dkernel"), got, want):
    assert g.shape == w.shape and g.dtype == w.dtype, name
    assert _rel(g, w) < TOL, (name, _rel(g, w))


@pytest.mark.parametrize("shape,k,cout,strides,padding", [
    ((2, 9, 9, 8), 1, 16, (1, 1), ((0, 0), (0, 0))),
    ((2, 9, 9, 8), 1, 16, (2, 2), ((0, 0), (0, 0))),  # ResNet's downsample.
    ((2, 8, 7, 5), 1, 3, (2, 1), ((1, 0), (0, 1))),   # Odd sizes, asymmetric padding.
    ((2, 9, 9, 8), 3, 4, (2, 2), ((1, 1), (1, 1))),   # Not 1x1: lax's path.
])
def test_matches_lax(monkeypatch, shape, k, cout, strides, padding):
  monkeypatch.setenv(conv_ops.ENV_VAR, "gemm")
  _assert_matches_lax(shape, k, cout, strides, padding)


@pytest.mark.parametrize("k", [1, 3])
def test_gemm_weight_grad_only_for_1x1(monkeypatch, k):
  """The point of the op: a 1x1 weight gradient is a dot, not a swapped convolution;
  larger kernels keep lax's (forward + two gradient convolutions)."""
  monkeypatch.setenv(conv_ops.ENV_VAR, "gemm")
  x, kernel = _normal((2, 6, 6, 8), 0), _normal((k, k, 8, 4), 1)
  pad = ((k // 2, k // 2),) * 2
  grad = jax.grad(lambda k: jnp.sum(conv_ops.conv_general_dilated(
      x, k, (1, 1), pad, dimension_numbers=DN) ** 2))
  hlo = jax.jit(grad).lower(kernel).as_text()
  assert hlo.count("convolution") == (1 if k == 1 else 2)  # Forward (+ weight gradient).
  assert ("dot_general" in hlo) == (k == 1)


def test_lax_impl_and_other_layouts_fall_back(monkeypatch):
  x, kernel = _normal((2, 6, 6, 8), 0), _normal((1, 1, 8, 4), 1)
  monkeypatch.setenv(conv_ops.ENV_VAR, "lax")
  plain = jax.grad(lambda k: jnp.sum(conv_ops.conv_general_dilated(
      x, k, (1, 1), ((0, 0), (0, 0)), dimension_numbers=DN) ** 2))
  assert "dot_general" not in jax.jit(plain).lower(kernel).as_text()
  monkeypatch.setenv(conv_ops.ENV_VAR, "gemm")
  nchw = conv_ops.conv_general_dilated(
      jnp.transpose(x, (0, 3, 1, 2)), jnp.transpose(kernel, (3, 2, 0, 1)), (1, 1),
      ((0, 0), (0, 0)), dimension_numbers=("NCHW", "OIHW", "NCHW"))
  want = lax.conv_general_dilated(x, kernel, (1, 1), ((0, 0), (0, 0)), dimension_numbers=DN)
  assert _rel(jnp.transpose(nchw, (0, 2, 3, 1)), want) < TOL


def test_bad_impl_is_named(monkeypatch):
  monkeypatch.setenv(conv_ops.ENV_VAR, "fast")
  with pytest.raises(ValueError, match=conv_ops.ENV_VAR):
    conv_ops.default_impl()


def test_default_on_cpu_is_ffi_where_built_else_gemm(monkeypatch):
  monkeypatch.delenv(conv_ops.ENV_VAR, raising=False)
  cpu = "ffi" if kernels.default_on("conv") else "gemm"
  assert conv_ops.default_impl() == (cpu if jax.default_backend() == "cpu" else "lax")


needs_kernels = pytest.mark.skipif(not kernels.available(),
                                   reason=f"CPU kernels: {kernels.unavailable_reason()}")


@needs_kernels
@pytest.mark.parametrize("shape,k,cout,strides,padding", [
    ((2, 9, 9, 16), 3, 32, (1, 1), ((1, 1), (1, 1))),  # Stride 1: all three by the kernel.
    ((2, 10, 9, 16), 3, 48, (2, 2), ((1, 1), (1, 1))),  # Stride 2: lax's input gradient.
    ((2, 15, 14, 3), 7, 64, (2, 2), ((3, 3), (3, 3))),  # ResNet's stem: lax forward.
    ((3, 8, 7, 32), 5, 16, (1, 1), ((2, 1), (0, 3))),  # 5x5, asymmetric padding.
    ((2, 7, 7, 70), 3, 80, (1, 1), ((1, 1), (1, 1))),  # Channels not multiples of 64.
    ((2, 6, 6, 20), 3, 16, (1, 2), ((0, 1), (1, 0))),  # Mixed strides, 20 input channels.
    ((2, 6, 6, 8), 3, 12, (1, 1), ((1, 1), (1, 1))),  # 12 outputs: lax's path entirely.
    ((2, 9, 9, 8), 1, 16, (2, 2), ((0, 0), (0, 0))),  # 1x1: the GEMM path.
    ((1, 10, 10, 16), 9, 16, (1, 1), ((4, 4), (4, 4))),  # 9x9: lax forward, kernel dW.
])
def test_ffi_matches_lax(monkeypatch, shape, k, cout, strides, padding):
  monkeypatch.setenv(conv_ops.ENV_VAR, "ffi")
  _assert_matches_lax(shape, k, cout, strides, padding)


@needs_kernels
@pytest.mark.parametrize("strides,convolutions", [((1, 1), 0), ((2, 2), 1)])
def test_ffi_replaces_convolutions(monkeypatch, strides, convolutions):
  """3x3: forward, weight gradient and (at stride 1) input gradient are kernel calls;
  only a strided input gradient is left to XLA's convolution."""
  monkeypatch.setenv(conv_ops.ENV_VAR, "ffi")
  x, kernel = _normal((2, 8, 8, 16), 0), _normal((3, 3, 16, 16), 1)
  loss = lambda x, k: jnp.sum(conv_ops.conv_general_dilated(
      x, k, strides, ((1, 1), (1, 1)), dimension_numbers=DN) ** 2)
  hlo = jax.jit(jax.grad(loss, (0, 1))).lower(x, kernel).as_text()
  assert hlo.count("stablehlo.convolution") == convolutions
  assert hlo.count("tlflax_conv_forward") == (2 if strides == (1, 1) else 1)
  assert hlo.count("tlflax_conv_weight_grad") == 1


@needs_kernels
def test_ffi_through_nn_conv_bf16(monkeypatch):
  monkeypatch.setenv(conv_ops.ENV_VAR, "ffi")
  x = _normal((2, 6, 6, 16), 0)
  make = lambda **kw: nn.Conv(16, (3, 3), padding=((1, 1), (1, 1)), use_bias=False,
                              dtype=jnp.bfloat16, **kw)
  ours, ref = make(conv_general_dilated=conv_ops.conv_general_dilated), make()
  params = ref.init(jax.random.key(0), x)
  y = ours.apply(params, x)
  assert y.dtype == jnp.bfloat16 and _rel(y, ref.apply(params, x)) < 1e-2
  loss = lambda m: lambda p: jnp.sum(m.apply(p, x).astype(jnp.float32) ** 2)
  k_ours = jax.grad(loss(ours))(params)["params"]["kernel"]
  k_ref = jax.grad(loss(ref))(params)["params"]["kernel"]
  assert k_ours.dtype == jnp.float32 and _rel(k_ours, k_ref) < 2e-2


def test_nn_conv_bf16_and_params_unchanged(monkeypatch):
  """Through flax's nn.Conv (as ConvBN uses it): same parameter tree, bf16 compute works."""
  monkeypatch.setenv(conv_ops.ENV_VAR, "gemm")
  x = _normal((2, 5, 5, 6), 0)
  ours = nn.Conv(4, (1, 1), (2, 2), padding=((0, 0), (0, 0)), use_bias=False,
                 dtype=jnp.bfloat16, conv_general_dilated=conv_ops.conv_general_dilated)
  ref = nn.Conv(4, (1, 1), (2, 2), padding=((0, 0), (0, 0)), use_bias=False,
                dtype=jnp.bfloat16)
  params = ref.init(jax.random.key(0), x)
  assert jax.tree.structure(ours.init(jax.random.key(0), x)) == jax.tree.structure(params)
  loss = lambda m: lambda p: jnp.sum(m.apply(p, x).astype(jnp.float32) ** 2)
  g_ours, g_ref = jax.grad(loss(ours))(params), jax.grad(loss(ref))(params)
  k_ours, k_ref = g_ours["params"]["kernel"], g_ref["params"]["kernel"]
  assert k_ours.dtype == k_ref.dtype == jnp.float32
  assert _rel(k_ours, k_ref) < 2e-2  # bf16 products, summed in different orders.
