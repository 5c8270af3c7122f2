"""The shifted CPU depthwise convolution equals lax's grouped convolution, values and gradients."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tlflax.ops import depthwise, kernels

CASES = [  # (n, h, w, c, kernel, stride, padding)
    (3, 9, 9, 5, 3, 1, ((1, 1), (1, 1))),
    (2, 10, 11, 4, 3, 2, ((1, 1), (1, 1))),
    (5, 8, 8, 6, 5, 2, ((1, 2), (1, 2))),  # TF "SAME" at stride 2: asymmetric.
    (2, 7, 7, 3, 3, 2, ((0, 1), (0, 1))),
    (4, 6, 6, 8, 5, 1, ((2, 2), (2, 2))),
    (7, 5, 5, 16, 3, 1, ((1, 1), (1, 1))),  # Batch not divisible by a chunk size.
]


def rel(a, b):
  return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def value_and_grads(impl, x, kernel, stride, padding, cotangent):
  def f(x, k):
    return depthwise.depthwise_conv2d(x, k, strides=(stride, stride), padding=padding, impl=impl)
  y = jax.jit(f)(x, kernel)
  gx, gk = jax.jit(jax.grad(lambda x, k: jnp.sum(f(x, k) * cotangent), argnums=(0, 1)))(x, kernel)
  return y, gx, gk


@pytest.mark.parametrize("case", CASES, ids=[str(c[:6]) for c in CASES])
def test_shifted_matches_lax(case):
  n, h, w, c, k, s, padding = case
  rng = np.random.RandomState(sum(case[:6]))
  x = jnp.asarray(rng.randn(n, h, w, c), jnp.float32)
  kernel = jnp.asarray(rng.randn(k, k, 1, c), jnp.float32)
  out_shape = jax.eval_shape(lambda: depthwise.depthwise_conv2d(
      x, kernel, strides=(s, s), padding=padding, impl="lax")).shape
  cotangent = jnp.asarray(rng.randn(*out_shape), jnp.float32)
  with jax.default_matmul_precision("highest"):
    expected = value_and_grads("lax", x, kernel, s, padding, cotangent)
    actual = value_and_grads("shifted", x, kernel, s, padding, cotangent)
  for name, a, b in zip(("output", "input grad", "kernel grad"), actual, expected):
    assert a.shape == b.shape, name
    assert rel(a, b) < 1e-5, name


def test_default_impl_follows_platform_and_env(monkeypatch):
  monkeypatch.delenv("TLFLAX_DEPTHWISE_IMPL", raising=False)
  cpu = "ffi" if kernels.default_on("depthwise") else "shifted"
  assert depthwise.default_impl() == (cpu if jax.default_backend() == "cpu" else "lax")
  monkeypatch.setenv("TLFLAX_DEPTHWISE_IMPL", "lax")
  assert depthwise.default_impl() == "lax"
  monkeypatch.setenv("TLFLAX_DEPTHWISE_IMPL", "fast")
  with pytest.raises(ValueError, match="TLFLAX_DEPTHWISE_IMPL"):
    depthwise.default_impl()


def test_bad_kernel_shape_is_a_clear_error():
  x = jnp.zeros((1, 8, 8, 4))
  with pytest.raises(ValueError):
    depthwise.depthwise_conv2d(x, jnp.zeros((3, 3, 4, 4)), impl="shifted")
