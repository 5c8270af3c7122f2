"""Bad input meets a clear error or a safe conversion: image modes, a workdir in use, NaN loss.

Covered elsewhere (not repeated here): broken / zero-byte / non-image files in a
folder dataset (tests/data/test_folder.py), unknown config fields
(tests/test_train.py::test_unknown_override_is_rejected, tests/data/test_config.py),
missing and hash-mismatched weight files (tests/pretrained/test_sources.py), damaged
checkpoints, a full disk and another model's checkpoint (tests/test_checkpoint.py).
"""
import io
import json
import logging
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from PIL import Image

from tests.tiny import tiny_digits_config
from tlflax import data, train, workdir
from tlflax.data import preprocess

COLOUR = (200, 40, 90)


def encoded(mode: str, image_format: str) -> bytes:
  """A 6x5 image of COLOUR saved in `mode` (grey, RGBA, CMYK, palette)."""
  image = Image.new("RGB", (6, 5), COLOUR)
  if mode == "P":
    image = image.quantize(colors=4)
  elif mode == "RGBA":
    image = image.convert("RGBA")
    image.putalpha(128)
  else:
    image = image.convert(mode)
  buffer = io.BytesIO()
  image.save(buffer, image_format)
  return buffer.getvalue()


MODES = [("L", "PNG"), ("LA", "PNG"), ("RGBA", "PNG"), ("P", "PNG"), ("CMYK", "JPEG"),
         ("L", "JPEG")]


def test_grey_rgba_cmyk_and_palette_images_are_read_as_rgb(tmp_path):
  for split in ("train", "val"):
    (tmp_path / split / "a").mkdir(parents=True)
    for mode, image_format in MODES:
      (tmp_path / split / "a" / f"{mode}.{image_format.lower()}").write_bytes(
          encoded(mode, image_format))
  config = data.default_config()
  config.name, config.root, config.image_size = "folder", str(tmp_path), 8
  pipe = data.build(config, batch_size=1, eval_batch_size=len(MODES))
  assert pipe.skipped == [] and pipe.num_train == len(MODES)
  grey = round(0.299 * COLOUR[0] + 0.587 * COLOUR[1] + 0.114 * COLOUR[2])
  for mode, image_format in MODES:
    pixels = preprocess.decode_image(encoded(mode, image_format)).numpy()
    assert pixels.shape == (5, 6, 3), (mode, image_format)
    expect = (grey,) * 3 if mode in ("L", "LA") else COLOUR  # RGBA: alpha dropped, not blended.
    np.testing.assert_allclose(pixels.reshape(-1, 3).mean(0), expect, atol=6,
                               err_msg=f"{mode} {image_format}")


def test_second_run_on_a_workdir_in_use_is_refused(tmp_path):
  held = workdir.lock(tmp_path)
  with pytest.raises(workdir.WorkdirInUseError) as error:
    train.run(tiny_digits_config(), str(tmp_path))
  message = str(error.value)
  assert "in use by another run" in message and f"pid {held_pid()}" in message
  assert "--workdir" in message
  assert not (tmp_path / "config.json").exists()  # Refused before writing anything.
  held.release()
  workdir.lock(tmp_path).release()  # Free again once the holder is done.


def held_pid():
  import os  # pylint: disable=g-import-not-at-top
  return os.getpid()


def test_lock_of_a_killed_run_is_stale_and_taken_over(tmp_path, caplog):
  dead = subprocess.Popen([sys.executable, "-c", "pass"])
  dead.wait()
  import socket  # pylint: disable=g-import-not-at-top
  (tmp_path / ".lock").write_text(json.dumps(
      {"host": socket.gethostname(), "pid": dead.pid, "started": "2026-01-01T00:00:00+00:00"}))
  with caplog.at_level(logging.WARNING):
    lock = workdir.lock(tmp_path)
  assert "stale lock" in caplog.text and f"pid {dead.pid}" in caplog.text
  assert "no longer exists" in caplog.text
  assert json.loads((tmp_path / ".lock").read_text())["pid"] == held_pid()
  lock.release()


def poisoned_build(at_step: int):
  """data.build whose train batch of `at_step` (1-based) holds a NaN pixel."""
  build = data.build

  def wrapped(*args, **kwargs):
    pipe = build(*args, **kwargs)
    batches = pipe.train_batches

    def train_batches(start_step=0):
      for step, batch in enumerate(batches(start_step=start_step), start_step + 1):
        if step == at_step:
          batch = dict(batch, image=np.where(True, np.nan, batch["image"]).astype(np.float32))
        yield batch
    pipe.train_batches = train_batches
    return pipe
  return wrapped


def test_nan_loss_stops_with_its_step_and_never_saves_a_nan_state(tmp_path, monkeypatch):
  monkeypatch.setattr(train.data, "build", poisoned_build(at_step=3))
  config = tiny_digits_config(total_steps=8)
  config.log_every_steps = 2
  with pytest.raises(train.NonFiniteLossError) as error:
    train.run(config, str(tmp_path))
  message = str(error.value)
  assert "NaN or Inf at step 3" in message and "noticed at step 4" in message
  assert "last good checkpoint is step 2" in message
  steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
  assert steps == [2]  # Step 4 (NaN) was not written.
  with ocp.StandardCheckpointer() as ckptr:
    restored = ckptr.restore(tmp_path / "checkpoints" / "2" / "default")
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree_util.tree_leaves(restored))
  assert not (tmp_path / ".lock").read_text()  # Lock released on the error.
