"""tlflax: transfer learning for computer vision in JAX/Flax.

Importing tlflax tunes glibc's malloc to keep and reuse freed memory (one arena,
no mmap for large blocks; `tlflax.xla_env.configure_malloc`): XLA CPU allocates
a step's buffers afresh every step, and by default each step faulted in ~1 GB
of new pages. It runs first, before JAX or TensorFlow start threads (each
would get its own arena). `TLFLAX_NO_MALLOC_TUNING=1` keeps glibc's defaults.
"""
from tlflax import xla_env as _xla_env

_xla_env.configure_malloc()

from tlflax.models import (create_detection_model, create_model, create_segmentation_model,
                           list_models)

__all__ = ["create_detection_model", "create_model", "create_segmentation_model", "list_models"]
__version__ = "0.1.0"
