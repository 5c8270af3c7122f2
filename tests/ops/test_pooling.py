"""Max pooling: the ffi kernel equals flax's nn.max_pool, forward and gradient, exactly."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tlflax.ops import kernels, pooling

pytestmark = pytest.mark.skipif(not kernels.available(),
                                reason=f"CPU kernels: {kernels.unavailable_reason()}")

CASES = [  # (x shape, window, strides, padding)
    ((2, 11, 13, 5), (3, 3), (2, 2), ((1, 1), (1, 1))),  # ResNet's stem pool, odd sizes
    ((2, 11, 13, 37), (3, 3), (2, 2), ((1, 1), (1, 1))),  # Two 16-channel vectors and 5 more
    ((2, 8, 8, 3), (2, 2), (2, 2), "VALID"),  # VGG
    ((1, 9, 9, 20), (3, 3), (2, 2), "VALID"),  # AlexNet / Inception (floor mode)
    ((2, 7, 6, 3), (3, 2), (1, 2), ((1, 0), (0, 1))),  # asymmetric everything
]


def _value_and_grad(pool, x, cotangent):
  y, vjp = jax.vjp(pool, x)
  return y, vjp(cotangent)[0]


@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "ties"])
@pytest.mark.parametrize("shape,window,strides,padding", CASES)
def test_ffi_equals_lax_exactly(shape, window, strides, padding, ties):
  """Bit-identical values and gradients; with ties (post-ReLU zeros and repeated
  integers) the gradient goes to the same, first, maximum as lax's."""
  rng = np.random.RandomState(sum(shape))
  x = rng.randn(*shape).astype(np.float32)
  if ties:
    x = np.maximum(np.round(x), 0.0).astype(np.float32)
  x = jnp.asarray(x)
  lax_pool = lambda x: nn.max_pool(x, window, strides, padding=padding)
  cotangent = jnp.asarray(rng.randn(*jax.eval_shape(lax_pool, x).shape), jnp.float32)
  want = _value_and_grad(lax_pool, x, cotangent)
  got = jax.jit(lambda x, c: _value_and_grad(
      lambda x: pooling.max_pool(x, window, strides, padding, impl="ffi"), x, c))(x, cotangent)
  for a, b in zip(got, want):
    assert a.shape == b.shape and a.dtype == b.dtype
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_bfloat16_and_nan():
  x = jnp.asarray(np.random.RandomState(0).randn(2, 6, 6, 3), jnp.bfloat16)
  y = pooling.max_pool(x, (3, 3), (2, 2), ((1, 1), (1, 1)), impl="ffi")
  assert y.dtype == jnp.bfloat16
  np.testing.assert_array_equal(y, nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1))))
  nan = jnp.array([[[[1.0], [jnp.nan]], [[3.0], [2.0]]]])
  assert np.isnan(pooling.max_pool(nan, (2, 2), (1, 1), impl="ffi")).all()


def test_bad_arguments_are_clear_errors(monkeypatch):
  with pytest.raises(ValueError, match="NHWC"):
    pooling.max_pool(jnp.zeros((4, 4, 3)), (2, 2), (2, 2))
  with pytest.raises(ValueError, match="padding"):
    pooling.max_pool(jnp.zeros((1, 4, 4, 3)), (2, 2), (2, 2), "SAME")
  monkeypatch.setenv(pooling.ENV_VAR, "cudnn")
  with pytest.raises(ValueError, match="TLFLAX_MAX_POOL_IMPL"):
    pooling.max_pool(jnp.zeros((1, 4, 4, 3)), (2, 2), (2, 2))
