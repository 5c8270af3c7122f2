"""XLA compile options for this project, applied before JAX starts its backend.

XLA reads `XLA_FLAGS` once, when the first backend is created, and aborts on a
flag it does not know. So flags are (1) added only when the installed jaxlib
contains them, (2) appended to whatever the user already put in `XLA_FLAGS`
(a user's own setting of the same flag wins), and (3) set before any array is
created. `tlflax.main` calls `configure()` first thing.
"""
from __future__ import annotations

import functools
import mmap
import os
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
