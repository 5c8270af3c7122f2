"""folder dataset: real data, broken files, strict mode, layout errors."""
import io
import logging
from pathlib import Path

import numpy as np
from PIL import Image
import pytest

from tlflax import data


def _config(root, **overrides):
  config = data.default_config()
  config.name = "folder"
  config.root = str(root)
  config.image_size = 32
  config.update(overrides)
  return config


def _png(colour=(10, 200, 30), size=(12, 9)) -> bytes:
  buffer = io.BytesIO()
  Image.new("RGB", size, colour).save(buffer, "PNG")
  return buffer.getvalue()


def _jpeg(size=(40, 30)) -> bytes:
  buffer = io.BytesIO()
  pixels = np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3))
  Image.fromarray(pixels.astype(np.uint8)).save(buffer, "JPEG")
  return buffer.getvalue()


@pytest.fixture
def messy_folder(tmp_path):
  """train/{a,b} and val/{a,b}; train/a also holds 3 broken files and a .txt."""
  for split in ("train", "val"):
    for name in ("a", "b"):
      (tmp_path / split / name).mkdir(parents=True)
      (tmp_path / split / name / "good.png").write_bytes(_png())
  bad = tmp_path / "train" / "a"
  (bad / "empty.jpg").write_bytes(b"")
  (bad / "truncated.jpg").write_bytes(_jpeg()[:400])
  (bad / "noise.png").write_bytes(
      np.random.default_rng(1).integers(0, 256, 500).astype(np.uint8).tobytes())
  (bad / "notes.txt").write_text("not an image")
  return tmp_path


def test_hymenoptera_counts_and_gif_report(hymenoptera, caplog):
  with caplog.at_level(logging.WARNING):
    pipe = data.build(_config(hymenoptera), batch_size=16, eval_batch_size=32)
  assert pipe.class_names == ["ants", "bees"]
  assert (pipe.num_train, pipe.num_eval) == (244, 153)
  assert [Path(p).name for p, _ in pipe.skipped] == ["imageNotFound.gif"]
  assert "imageNotFound.gif" in caplog.text
  batch = next(pipe.train_batches(start_step=3))
  assert batch["image"].shape == (16, 32, 32, 3)
  assert set(np.unique(batch["label"])) <= {0, 1}


def test_broken_files_are_skipped_and_reported(messy_folder, caplog):
  with caplog.at_level(logging.WARNING):
    pipe = data.build(_config(messy_folder), batch_size=2, eval_batch_size=2)
  assert (pipe.num_train, pipe.num_eval) == (2, 2)
  reasons = {Path(p).name: r for p, r in pipe.skipped}
  assert set(reasons) == {"empty.jpg", "truncated.jpg", "noise.png",
                          "notes.txt"}
  assert "extension" in reasons["notes.txt"]
  for name in reasons:
    assert name in caplog.text
  kept = pipe.source.train_records.table["path"]
  assert sorted(Path(p).name for p in kept) == ["good.png", "good.png"]
  batch = next(pipe.train_batches())
  np.testing.assert_array_equal(np.sort(batch["label"]), [0, 1])
  eval_batches = list(pipe.eval_batches())
  assert sum(b["mask"].sum() for b in eval_batches) == 2


def test_strict_raises_naming_the_bad_files(messy_folder):
  with pytest.raises(ValueError) as error:
    data.build(_config(messy_folder, strict=True), batch_size=2)
  for name in ("empty.jpg", "truncated.jpg", "noise.png", "notes.txt"):
    assert name in str(error.value)


def test_cache_gives_the_same_batches(messy_folder):
  a = data.build(_config(messy_folder, cache=False), batch_size=2, seed=7)
  b = data.build(_config(messy_folder, cache=True), batch_size=2, seed=7)
  assert b.records("train").in_memory
  for x, y in zip(list(zip(range(3), a.train_batches())),
                  list(zip(range(3), b.train_batches()))):
    np.testing.assert_array_equal(x[1]["image"], y[1]["image"])
  x, y = next(a.eval_batches()), next(b.eval_batches())
  np.testing.assert_array_equal(x["image"], y["image"])


def test_missing_root_names_the_path_and_layout(tmp_path):
  missing = tmp_path / "nowhere"
  with pytest.raises(FileNotFoundError) as error:
    data.build(_config(missing), batch_size=2)
  assert str(missing) in str(error.value)
  assert "<root>/<train_split>/<class>/<image>" in str(error.value)


def test_missing_split_and_class_mismatch(tmp_path):
  (tmp_path / "train" / "a").mkdir(parents=True)
  (tmp_path / "train" / "a" / "x.png").write_bytes(_png())
  with pytest.raises(FileNotFoundError, match="val"):
    data.build(_config(tmp_path), batch_size=1)
  (tmp_path / "val" / "b").mkdir(parents=True)
  with pytest.raises(ValueError, match=r"missing in val: \['a'\]"):
    data.build(_config(tmp_path), batch_size=1)


def test_no_images_is_an_error(tmp_path):
  for split in ("train", "val"):
    (tmp_path / split / "a").mkdir(parents=True)
  with pytest.raises(ValueError, match="No usable images"):
    data.build(_config(tmp_path), batch_size=1)


def test_relative_root_and_upper_case_extension(tmp_path, monkeypatch):
  for split in ("train", "val"):
    (tmp_path / "ds" / split / "a").mkdir(parents=True)
    (tmp_path / "ds" / split / "a" / "X.PNG").write_bytes(_png())
  monkeypatch.chdir(tmp_path)
  pipe = data.build(_config("ds"), batch_size=1)
  assert (pipe.num_train, pipe.num_eval, pipe.skipped) == (1, 1, [])
  assert next(pipe.train_batches(start_step=5))["image"].shape == (1, 32, 32, 3)


def _save(path, mode, image_format):
  Image.new("RGB", (6, 5), (90, 90, 90)).convert(mode).save(path, image_format)


def test_content_decides_not_the_extension(tmp_path):
  """Kept: a PNG named .jpg (TF sniffs content). Skipped: what TF can't read."""
  for split in ("train", "val"):
    (tmp_path / split / "a").mkdir(parents=True)
    _save(tmp_path / split / "a" / "ok.jpg", "RGB", "PNG")
  _save(tmp_path / "train" / "a" / "tiff.png", "RGB", "TIFF")
  _save(tmp_path / "train" / "a" / "one_bit.bmp", "1", "BMP")
  _save(tmp_path / "train" / "a" / "rgb.bmp", "RGB", "BMP")
  pipe = data.build(_config(tmp_path), batch_size=1)
  assert pipe.num_train == 2
  reasons = {Path(p).name: r for p, r in pipe.skipped}
  assert set(reasons) == {"tiff.png", "one_bit.bmp"}
  assert "TIFF" in reasons["tiff.png"] and "function_node" not in reasons[
      "one_bit.bmp"]
