"""Every ISA level the kernels are compiled for: parity with lax, and AVX2 == AVX-512.

The kernels run at the best level the CPU has; `kernels.set_isa` lowers it at
run time, so one machine with AVX-512 tests the AVX2 and baseline builds too
(each level has its own vector width and tile shapes, so each is its own code).
AVX2 and AVX-512 must agree bit for bit: every output sums the same terms in the
same order with fused multiply-adds, whatever the tile shape. Baseline has no FMA.
"""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from jax import lax  # noqa: E402

from tests.ops.test_conv import _fwd_and_grads, _normal, _rel  # noqa: E402
from tlflax.ops import conv, depthwise, kernels, pooling  # noqa: E402

pytestmark = pytest.mark.skipif(not kernels.available(),
                                reason=f"CPU kernels: {kernels.unavailable_reason()}")
LEVELS = kernels.runnable_isas()

CONV_CASES = [  # (x shape, k, cout, strides, padding): tile edges at every level's widths.
    ((2, 9, 7, 16), 3, 48, (1, 1), ((1, 1), (1, 1))),  # 48 = 3 AVX-512 / 6 AVX2 vectors.
    ((2, 7, 7, 70), 3, 80, (1, 1), ((1, 1), (1, 1))),  # dW split by rows; input channels % 6.
    ((1, 6, 6, 256), 3, 256, (1, 1), ((1, 1), (1, 1))),  # dW split by input channels.
    ((2, 10, 9, 16), 3, 16, (2, 2), ((0, 1), (1, 0))),  # Stride 2, asymmetric padding.
]
DEPTHWISE_CASES = [  # (x shape, k, strides, dilation): channels below / across vector blocks.
    ((2, 9, 9, 8), 3, (1, 1), (1, 1)),
    ((2, 12, 11, 72), 3, (2, 2), (1, 1)),
    ((1, 10, 10, 37), 5, (1, 1), (2, 2)),
]


@pytest.fixture
def at_level(request):
  """Runs the test body at the requested ISA level, restoring the CPU's own afterwards."""
  before = kernels.isa()
  kernels.set_isa(request.param)
  yield request.param
  kernels.set_isa(before)


def _conv(shape, k, cout, strides, padding):
  x, kernel = _normal(shape, 0), _normal((k, k, shape[-1], cout), 1)
  return _fwd_and_grads(conv.conv_general_dilated, x, kernel, strides, padding)


def _depthwise(shape, k, strides, dilation):
  x, kernel = _normal(shape, 2), _normal((k, k, 1, shape[-1]), 3)
  pad = ((k // 2 * dilation[0],) * 2, (k // 2 * dilation[1],) * 2)

  def run(impl):
    f = lambda x, w: depthwise.depthwise_conv2d(x, w, strides=strides, padding=pad,
                                                dilation=dilation, impl=impl)
    y, vjp = jax.vjp(f, x, kernel)
    return (y,) + vjp(_normal(y.shape, 4))

  return run


def _max_pool(impl):
  x = jnp.asarray(np.maximum(np.round(np.random.RandomState(5).randn(2, 11, 13, 37)), 0),
                  jnp.float32)
  f = lambda x: pooling.max_pool(x, (3, 3), (2, 2), ((1, 1), (1, 1)), impl=impl)
  y, vjp = jax.vjp(f, x)
  return y, vjp(_normal(y.shape, 6))[0]


@pytest.mark.parametrize("at_level", LEVELS, indirect=True)
@pytest.mark.parametrize("case", CONV_CASES)
def test_conv_kernel_matches_lax_at_every_level(monkeypatch, at_level, case):
  monkeypatch.setenv(conv.ENV_VAR, "lax")
  want = _conv(*case)
  monkeypatch.setenv(conv.ENV_VAR, "ffi")
  for name, g, w in zip(("y", "dx", "dkernel"), _conv(*case), want):
    assert _rel(g, w) < 1e-5, (at_level, name, _rel(g, w))


@pytest.mark.parametrize("at_level", LEVELS, indirect=True)
@pytest.mark.parametrize("case", DEPTHWISE_CASES)
def test_depthwise_kernel_matches_lax_at_every_level(at_level, case):
  run = _depthwise(*case)
  with jax.default_matmul_precision("highest"):
    want = jax.jit(lambda: run("lax"))()
  for name, g, w in zip(("y", "dx", "dkernel"), jax.jit(lambda: run("ffi"))(), want):
    assert _rel(g, w) < 1e-5, (at_level, name, _rel(g, w))


@pytest.mark.parametrize("at_level", LEVELS, indirect=True)
def test_max_pool_kernel_equals_lax_at_every_level(at_level):
  for g, w in zip(jax.jit(lambda: _max_pool("ffi"))(), _max_pool("lax")):
    np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


@pytest.mark.skipif("avx512" not in LEVELS, reason="this CPU has no AVX-512 to compare with")
def test_avx2_and_avx512_are_bit_identical(monkeypatch):
  monkeypatch.setenv(conv.ENV_VAR, "ffi")
  runs = {}
  before = kernels.isa()
  try:
    for level in ("avx2", "avx512"):
      kernels.set_isa(level)
      outs = [o for case in CONV_CASES for o in _conv(*case)]
      outs += [o for case in DEPTHWISE_CASES for o in jax.jit(lambda: _depthwise(*case)("ffi"))()]
      outs += list(jax.jit(lambda: _max_pool("ffi"))())
      runs[level] = [np.asarray(o) for o in outs]
  finally:
    kernels.set_isa(before)
  for a, b in zip(runs["avx2"], runs["avx512"]):
    np.testing.assert_array_equal(a, b)


def test_levels_and_bad_levels_are_named():
  assert kernels.isa() == kernels.supported_isa() or os.environ.get(kernels.ISA_ENV_VAR)
  assert LEVELS[0] == "baseline" and LEVELS[-1] == kernels.supported_isa()
  with pytest.raises(ValueError, match="unknown ISA level.*baseline"):
    kernels.set_isa("sse9")
  if kernels.supported_isa() != "avx512":
    with pytest.raises(ValueError, match="at most"):
      kernels.set_isa("avx512")


@pytest.mark.parametrize("at_level", ["baseline"], indirect=True)
def test_no_kernel_is_the_default_at_baseline(monkeypatch, at_level):
  for op in (conv, depthwise, pooling):
    monkeypatch.delenv(op.ENV_VAR, raising=False)
  if jax.default_backend() == "cpu":
    assert (conv.default_impl(), depthwise.default_impl(), pooling.default_impl()) == (
        "gemm", "shifted", "lax")


def test_isa_environment_variable_is_checked_at_load(tmp_path):
  """`TLFLAX_CPU_ISA` lowers the level in a fresh process; a bad value names the variable."""
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  code = "from tlflax.ops import kernels; print(kernels.isa())"
  env = dict(os.environ, **{kernels.ISA_ENV_VAR: "baseline"})
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       check=True, cwd=os.path.dirname(os.path.dirname(os.path.dirname(
                           os.path.abspath(__file__)))))
  assert out.stdout.strip() == "baseline"
  env[kernels.ISA_ENV_VAR] = "avx1024"
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
                           __file__)))))
  assert out.returncode != 0 and "TLFLAX_CPU_ISA='avx1024'" in out.stderr
