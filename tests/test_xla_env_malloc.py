"""glibc malloc settings for XLA's per-step buffers (tlflax.xla_env.configure_malloc)."""
import os
import platform
import subprocess
import sys

import pytest

from tlflax import xla_env

# Faults while a step-sized buffer (256 MiB) is allocated, touched and freed 5 times.
PROBE = """
import ctypes, resource, sys
from tlflax import xla_env  # Importing tlflax applies the settings (unless turned off).
applied = xla_env.configure_malloc()  # Again, to read whether they apply.
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
size = 256 << 20
def cycle():
  p = libc.malloc(size)
  ctypes.memset(p, 1, size)
  libc.free(ctypes.c_void_p(p))
cycle()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
  cycle()
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(**env):
  environ = {k: v for k, v in os.environ.items() if k != "TLFLAX_NO_MALLOC_TUNING"}
  out = subprocess.run([sys.executable, "-c", PROBE], text=True, capture_output=True,
                       check=True, timeout=120, env={**environ, **env}).stdout.split()
  return out[0] == "True", int(out[1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt settings are glibc's")
def test_freed_step_buffers_are_reused_without_page_faults():
  applied, tuned = _faults()
  not_applied, default = _faults(TLFLAX_NO_MALLOC_TUNING="1")
  assert applied and not not_applied
  assert default > 5 * 60000  # 256 MiB is 65536 pages, faulted in again on every cycle.
  assert tuned < 1000  # Kept and reused.


def test_turned_off_by_environment():
  applied, _ = _faults(TLFLAX_NO_MALLOC_TUNING="1")
  assert not applied
