"""Finds image files that tf.data could not decode, before training starts.

A broken file inside tf.data kills the input pipeline mid-epoch (or, with
`ignore_errors`, silently changes the epoch length and every later batch).
Decoding each file once with PIL at build time, in a thread pool (PIL
releases the GIL while decoding), turns that into a named list up front.
"""
from __future__ import annotations

import concurrent.futures
import os
import re
from typing import Dict, Iterable, Optional

# What `tf.io.decode_image` understands (MPO is the JPEG variant cameras write).
TF_FORMATS = frozenset({"JPEG", "MPO", "PNG", "GIF", "BMP", "WEBP"})


def _tf_decodes(path: str) -> Optional[str]:
  """TF's BMP decoder is narrower than PIL's (no 1-bit, no RLE): ask TF."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  try:
    tf.io.decode_image(tf.io.read_file(path), channels=3,
                       expand_animations=False)
  except (tf.errors.InvalidArgumentError, ValueError) as e:
    return f"BMP variant tf.io.decode_image cannot read ({_first_line(e)})"
  return None


def _first_line(error: BaseException) -> str:
  """The error's message without TF's {{function_node ...}} / [Op:...] noise."""
  text = re.sub(r"\{\{[^}]*\}\}|\[Op:[^\]]*\].*", "", str(error)).strip()
  return text.splitlines()[0][:200] if text else type(error).__name__


def check_image(path: str) -> Optional[str]:
  """Returns why `path` is not a decodable image, or None when it is fine."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  try:
    if os.path.getsize(path) == 0:
      return "empty file (0 bytes)"
    with Image.open(path) as image:
      image_format = image.format
      image.load()  # Full decode: catches truncated and corrupt data.
  except Image.UnidentifiedImageError:
    return "not an image (PIL cannot identify the content)"
  except Exception as e:  # pylint: disable=broad-except
    return f"corrupt or truncated image ({type(e).__name__}: {_first_line(e)})"
  if image_format not in TF_FORMATS:
    return (f"{image_format} content, which tf.io.decode_image cannot decode "
            f"(it reads {', '.join(sorted(TF_FORMATS))})")
  if image_format == "BMP":
    return _tf_decodes(path)
  return None


def find_broken(paths: Iterable[str],
                max_workers: Optional[int] = None) -> Dict[str, str]:
  """{path: reason} for every path that fails `check_image`."""
  paths = list(paths)
  with concurrent.futures.ThreadPoolExecutor(max_workers) as pool:
    reasons = pool.map(check_image, paths)
    return {p: r for p, r in zip(paths, reasons) if r is not None}
