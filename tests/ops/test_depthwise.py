"""Parity of the shifted and ffi depthwise convolutions with lax.conv, and the API contract."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from tlflax.ops import depthwise, kernels  # noqa: E402
from tlflax.ops.depthwise import default_impl, depthwise_conv2d  # noqa: E402

TOL = 1e-5
FAST_IMPLS = ["shifted", pytest.param("ffi", marks=pytest.mark.skipif(
    not kernels.available(), reason=f"CPU kernels: {kernels.unavailable_reason()}"))]


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


def _normal(shape, seed):
  return jnp.asarray(np.random.RandomState(seed).randn(*shape), jnp.float32)


def _inputs(shape, k, seed=0):
  return _normal(shape, seed), _normal((k, k, 1, shape[-1]), seed + 1)


def _fwd_and_grads(impl, x, kernel, strides, padding):
  """Forward and both gradients against a fixed random cotangent, all under one jit."""
  f = lambda x, k: depthwise_conv2d(x, k, strides=strides, padding=padding, impl=impl)
  dy = _normal(jax.eval_shape(f, x, kernel).shape, 7)

  @jax.jit
  def run(x, kernel, dy):
    y, vjp = jax.vjp(f, x, kernel)
    return (y,) + vjp(dy)

  with jax.default_matmul_precision("highest"):
    return run(x, kernel, dy)


def _assert_parity(x, kernel, strides, padding, impl="shifted"):
  got = _fwd_and_grads(impl, x, kernel, strides, padding)
  want = _fwd_and_grads("lax", x, kernel, strides, padding)
  for name, a, b in zip(("forward", "input grad", "weight grad"), got, want):
    assert a.shape == b.shape and a.dtype == b.dtype, name
    assert _rel(a, b) < TOL, (name, _rel(a, b))


@pytest.fixture
def small_chunks(monkeypatch):
  """Chunks of 2 images of the shapes below, so the batch loop and its tail run."""
  monkeypatch.setattr(depthwise, "_CHUNK_BYTES", 2 * 9 * 9 * 4 * 4)


CASES = [  # (x shape, kernel, stride, padding)
    ((5, 9, 9, 4), 3, 1, ((1, 1), (1, 1))),  # odd size, symmetric
    ((5, 8, 10, 4), 3, 2, ((1, 1), (1, 1))),  # even size, stride 2
    ((5, 8, 8, 4), 3, 2, ((0, 1), (0, 1))),  # TF "SAME" at stride 2
    ((5, 9, 7, 4), 5, 1, ((2, 2), (2, 2))),  # 5x5
    ((5, 10, 9, 4), 5, 2, ((1, 2), (2, 1))),  # 5x5, asymmetric both ways
    ((5, 9, 9, 4), 3, 2, ((0, 0), (0, 0))),  # "VALID"
]


@pytest.mark.parametrize("impl", FAST_IMPLS)
@pytest.mark.parametrize("shape,k,stride,padding", CASES)
def test_parity_with_lax(small_chunks, shape, k, stride, padding, impl):
  x, kernel = _inputs(shape, k)
  _assert_parity(x, kernel, (stride, stride), padding, impl)


def test_parity_without_batch_loop():
  """Chunk larger than the batch: one block, no loop."""
  x, kernel = _inputs((3, 9, 8, 6), 3)
  _assert_parity(x, kernel, (1, 1), ((1, 1), (1, 1)))
  _assert_parity(x, kernel, (2, 2), ((0, 1), (1, 0)))


@pytest.mark.parametrize("impl", FAST_IMPLS)
def test_parity_mixed_strides(small_chunks, impl):
  x, kernel = _inputs((3, 9, 9, 4), 3)
  _assert_parity(x, kernel, (2, 1), ((1, 1), (0, 2)), impl)


@pytest.mark.skipif(not kernels.available(), reason=f"CPU kernels: {kernels.unavailable_reason()}")
def test_ffi_larger_than_7x7_falls_back_to_shifted(small_chunks):
  x, kernel = _inputs((2, 12, 12, 4), 9)
  _assert_parity(x, kernel, (1, 1), ((4, 4), (4, 4)), "ffi")


def test_grad_under_jit_twice_no_retrace(small_chunks):
  """jax.grad through the custom_vjp in a jitted step; a second call reuses the trace."""
  traces = []

  @jax.jit
  def loss_grad(x, kernel):
    traces.append(1)
    loss = lambda k: jnp.sum(depthwise_conv2d(x, k, impl="shifted") ** 2)
    return jax.grad(loss)(kernel)

  x, kernel = _inputs((3, 9, 9, 4), 3)
  g1 = loss_grad(x, kernel)
  g2 = loss_grad(x + 1.0, kernel)
  with jax.default_matmul_precision("highest"):
    want = jax.grad(lambda k: jnp.sum(depthwise_conv2d(x + 1.0, k, impl="lax") ** 2))(kernel)
  assert len(traces) == 1
  assert not np.allclose(g1, g2)
  assert _rel(g2, want) < TOL


@pytest.mark.parametrize("impl", FAST_IMPLS)
def test_bfloat16_keeps_dtypes(small_chunks, impl):
  """bf16 in, bf16 out; float32 kernel keeps a float32 gradient (f32 accumulation inside)."""
  x, kernel = _inputs((3, 8, 8, 4), 3)
  xb = x.astype(jnp.bfloat16)

  def loss(x, k, impl):
    y = depthwise_conv2d(x, k, strides=(2, 2), padding=((0, 1), (0, 1)), impl=impl)
    return jnp.sum(y.astype(jnp.float32) ** 2), y.dtype

  (_, ydt), (dx, dk) = jax.value_and_grad(loss, (0, 1), has_aux=True)(xb, kernel, impl)
  assert ydt == jnp.bfloat16 and dx.dtype == jnp.bfloat16 and dk.dtype == jnp.float32
  with jax.default_matmul_precision("highest"):
    _, (dx_ref, dk_ref) = jax.value_and_grad(loss, (0, 1), has_aux=True)(xb, kernel, "lax")
  assert _rel(dx, dx_ref) < 2e-2 and _rel(dk, dk_ref) < 2e-2


def test_default_impl_follows_env(monkeypatch):
  monkeypatch.delenv(depthwise.ENV_VAR, raising=False)
  cpu = "ffi" if kernels.default_on("depthwise") else "shifted"
  assert default_impl() == (cpu if jax.default_backend() == "cpu" else "lax")
  monkeypatch.setenv(depthwise.ENV_VAR, "lax")
  assert default_impl() == "lax"
  monkeypatch.setenv(depthwise.ENV_VAR, "shifted")
  assert default_impl() == "shifted"
  monkeypatch.setenv(depthwise.ENV_VAR, "bogus")
  with pytest.raises(ValueError, match="TLFLAX_DEPTHWISE_IMPL"):
    default_impl()


def test_impl_none_uses_default(monkeypatch):
  """impl=None goes through default_impl(); both choices give the same numbers."""
  x, kernel = _inputs((2, 6, 6, 3), 3)
  monkeypatch.setenv(depthwise.ENV_VAR, "lax")
  a = depthwise_conv2d(x, kernel)
  monkeypatch.setenv(depthwise.ENV_VAR, "shifted")
  b = depthwise_conv2d(x, kernel)
  assert _rel(b, a) < TOL


@pytest.mark.parametrize("kshape", [(3, 3, 4, 1), (3, 3, 1, 5), (3, 3, 4), (9, 4)])
def test_wrong_kernel_shape_is_a_clear_error(kshape):
  x = jnp.zeros((2, 6, 6, 4))
  with pytest.raises(ValueError, match=r"kernel must be \(kh, kw, 1, C=4\)"):
    depthwise_conv2d(x, jnp.zeros(kshape), impl="shifted")


def test_bad_impl_and_input_rank():
  x, kernel = _inputs((2, 6, 6, 3), 3)
  with pytest.raises(ValueError, match="impl"):
    depthwise_conv2d(x, kernel, impl="cudnn")
  with pytest.raises(ValueError, match="NHWC"):
    depthwise_conv2d(x[0], kernel, impl="shifted")
