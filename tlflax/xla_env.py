"""Process settings for XLA's CPU runtime, applied before JAX starts its backend.

XLA reads `XLA_FLAGS` once, when the first backend is created, and aborts on a
flag it does not know. So flags are (1) added only when the installed jaxlib
contains them, (2) appended to whatever the user already put in `XLA_FLAGS`
(a user's own setting of the same flag wins), and (3) set before any array is
created. `tlflax.main` calls `configure()` first thing.

Memory: XLA CPU allocates a step's large buffers afresh every step; by default
glibc serves them with mmap (or from per-thread arenas it trims) and hands them
back to the kernel when freed, so every step faults in ~1 GB of new 4 KiB pages
(MobileNetV2 training at 128 px, batch 32: 223k page faults per step, ResNet-18
at 224 px: 256k). `configure_malloc()` has glibc keep and reuse that memory
instead: 0 and 45k faults, and those steps went from 404 to 257 ms and from
1153 to 961 ms on this machine (benchmarks/README.md). `import tlflax` calls it
first thing; `TLFLAX_NO_MALLOC_TUNING=1` turns it off.
"""
from __future__ import annotations

import ctypes
import functools
import mmap
import os
import platform
from pathlib import Path
from typing import Dict, List

# Measured on a 2-core AVX2 CPU (see README "Performance"): sends convolutions
# to Eigen instead of YNNPACK fusions; doubles ResNet-18 training speed and,
# combined with the shifted depthwise convolution, MobileNetV2's too.
CPU_FLAGS: Dict[str, str] = {
    "xla_cpu_experimental_ynn_fusion_type": "-individual_convolution",
}


@functools.lru_cache(maxsize=None)
def jaxlib_knows_flag(name: str) -> bool:
  """True when the installed jaxlib's binary contains the flag's name."""
  try:
    import jaxlib  # Import of jaxlib alone does not start a backend.
  except ImportError:
    return False
  for lib in Path(jaxlib.__file__).parent.glob("*.so"):
    if lib.stat().st_size < 1 << 20:
      continue  # Small stubs; the flags live in the big shared library.
    with open(lib, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
      if m.find(name.encode()) >= 0:
        return True
  return False


def _flag_names(xla_flags: str) -> List[str]:
  return [f.lstrip("-").split("=", 1)[0] for f in xla_flags.split() if f.startswith("--")]


def configure(enable_cpu_flags: bool = True) -> str:
  """Appends the known-good CPU flags to `XLA_FLAGS`; returns the resulting value.

  Does nothing when `TLFLAX_NO_XLA_FLAGS=1` or when the platform is explicitly
  something other than CPU.
  """
  current = os.environ.get("XLA_FLAGS", "")
  platforms = [p for p in os.environ.get("JAX_PLATFORMS", "").split(",") if p]
  if (not enable_cpu_flags or os.environ.get("TLFLAX_NO_XLA_FLAGS") == "1"
      or (platforms and "cpu" not in platforms)):
    return current
  present = set(_flag_names(current))
  extra = [f"--{name}={value}" for name, value in CPU_FLAGS.items()
           if name not in present and jaxlib_knows_flag(name)]
  if extra:
    os.environ["XLA_FLAGS"] = " ".join([current] + extra).strip()
  return os.environ.get("XLA_FLAGS", "")



# glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -2, -4, -8
MALLOC_SETTINGS = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1),
                   (_M_TOP_PAD, 1 << 30))


def configure_malloc() -> bool:
  """Has glibc keep freed memory for reuse instead of handing it back to the kernel.

  One arena, no mmap for large blocks, no trimming of the heap, and 1 GiB
  of padding per heap growth: the buffers a step frees are the ones the next
  step allocates, without new page faults. The process's resident memory stays
  at its peak instead of shrinking between steps (as with a caching allocator).
  Returns whether the settings were applied: glibc only, and not with
  `TLFLAX_NO_MALLOC_TUNING=1`. `import tlflax` calls it before anything else, as
  threads that already have an arena keep it.
  """
  if os.environ.get("TLFLAX_NO_MALLOC_TUNING") == "1" or platform.libc_ver()[0] != "glibc":
    return False
  try:
    mallopt = ctypes.CDLL(None).mallopt
  except (OSError, AttributeError):
    return False
  return all(mallopt(param, value) == 1 for param, value in MALLOC_SETTINGS)
