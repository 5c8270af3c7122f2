"""tlflax's compiled CPU kernels: they are built, and they are deterministic.

Parity with lax is tested per op (test_depthwise*.py, test_pooling.py); here: the
install compiled them (a broken build must fail CI, not silently fall back),
repeated calls are bit-identical (the weight gradient's partial sums are added
in a fixed order), and a missing build explains itself.
"""
import os
import platform
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tlflax.ops import conv, depthwise, kernels


def test_kernels_are_built_where_they_should_be():
  if os.environ.get("TLFLAX_NO_CPU_KERNELS"):
    pytest.skip("TLFLAX_NO_CPU_KERNELS is set: the install skipped the kernels on purpose.")
  if not (sys.platform.startswith("linux") and platform.machine() in ("x86_64", "aarch64")):
    pytest.skip(f"kernels are only required on Linux x86_64/aarch64, not {sys.platform} "
                f"{platform.machine()}")
  assert kernels.available(), kernels.unavailable_reason()


@pytest.mark.skipif(not kernels.available(), reason=f"CPU kernels: {kernels.unavailable_reason()}")
def test_ffi_depthwise_gradients_are_bit_identical_run_to_run():
  rng = np.random.RandomState(0)
  x = jnp.asarray(rng.randn(8, 20, 20, 40), jnp.float32)
  kernel = jnp.asarray(rng.randn(3, 3, 1, 40), jnp.float32)

  def grads(x, kernel):
    loss = lambda x, k: jnp.sum(jnp.sin(depthwise.depthwise_conv2d(x, k, impl="ffi")))
    return jax.grad(loss, (0, 1))(x, kernel)

  first = jax.jit(grads)(x, kernel)
  for _ in range(3):
    again = jax.jit(grads)(x + 0.0, kernel)
    for a, b in zip(first, again):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.skipif(not kernels.available(), reason=f"CPU kernels: {kernels.unavailable_reason()}")
@pytest.mark.parametrize("cin,cout", [(16, 32), (256, 256)])  # dW split by rows / by channels.
def test_ffi_conv_gradients_are_bit_identical_run_to_run(monkeypatch, cin, cout):
  monkeypatch.setenv(conv.ENV_VAR, "ffi")
  rng = np.random.RandomState(0)
  x = jnp.asarray(rng.randn(4, 6, 6, cin), jnp.float32)
  kernel = jnp.asarray(rng.randn(3, 3, cin, cout) * 0.1, jnp.float32)
  loss = lambda x, k: jnp.sum(jnp.sin(conv.conv_general_dilated(
      x, k, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"))))
  grads = jax.jit(jax.grad(loss, (0, 1)))
  first = grads(x, kernel)
  for _ in range(3):
    for a, b in zip(first, grads(x + 0.0, kernel)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_missing_build_is_a_clear_error(monkeypatch):
  monkeypatch.delenv(depthwise.ENV_VAR, raising=False)
  monkeypatch.setattr(kernels, "_load", lambda: "tlflax.ops._cpu_kernels is not built")
  with pytest.raises(RuntimeError, match="tlflax_depthwise_forward.*not built"):
    kernels.call("tlflax_depthwise_forward", jax.ShapeDtypeStruct((1,), jnp.float32))
  assert depthwise.default_impl() == ("shifted" if jax.default_backend() == "cpu" else "lax")
