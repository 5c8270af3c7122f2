"""`tlflax.predict`: a trained workdir on a folder of images, bad files reported."""
import csv

import jax
import numpy as np
import pytest
from PIL import Image

from tests.test_train import tiny_digits_config
from tlflax import predict, train


@pytest.fixture(scope="module")
def trained_workdir(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("run")
  train.run(tiny_digits_config(total_steps=2), str(workdir))
  return workdir


def image_folder(tmp_path):
  folder = tmp_path / "images"
  (folder / "sub").mkdir(parents=True)
  rng = np.random.RandomState(0)
  Image.fromarray(rng.randint(0, 255, (40, 30, 3), np.uint8)).save(folder / "a.png")
  Image.fromarray(rng.randint(0, 255, (20, 20), np.uint8)).save(folder / "sub" / "grey.jpg")
  Image.fromarray(rng.randint(0, 255, (33, 33, 4), np.uint8)).save(folder / "rgba.png")
  (folder / "broken.jpg").write_bytes(b"not a jpeg")
  (folder / "notes.txt").write_text("ignored: not an image")
  return folder


def test_classification_predictions_match_the_model(trained_workdir, tmp_path):
  folder = image_folder(tmp_path)
  summary = predict.predict(str(trained_workdir), str(folder), str(tmp_path / "out"),
                            batch_size=2, top_k=3)
  assert summary == {"task": "classification", "step": 2, "images": 4, "failed": 1,
                     "out": str(tmp_path / "out")}
  with open(tmp_path / "out" / "predictions.csv") as f:
    rows = {r["file"].split("images/")[1]: r for r in csv.DictReader(f)}
  assert set(rows) == {"a.png", "broken.jpg", "rgba.png", "sub/grey.jpg"}
  assert "UnidentifiedImageError" in rows["broken.jpg"]["error"]
  model = predict.TrainedModel(str(trained_workdir))
  x = predict.classification_input(predict.read_rgb(folder / "a.png"), model)
  probs = np.asarray(jax.nn.softmax(model(x[None]))[0])
  best = np.argsort(-probs)[:3]
  assert [rows["a.png"][f"label_{i + 1}"] for i in range(3)] == [model.class_names[c] for c in best]
  np.testing.assert_allclose([float(rows["a.png"][f"prob_{i + 1}"]) for i in range(3)],
                             probs[best], atol=1e-6)


def test_missing_workdir_and_empty_folder_fail_clearly(trained_workdir, tmp_path):
  with pytest.raises(FileNotFoundError, match="config.json is missing"):
    predict.TrainedModel(str(tmp_path))
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="No image files"):
    predict.predict(str(trained_workdir), str(tmp_path / "empty"), str(tmp_path / "out"))


def test_overlay_and_palette():
  colours = predict.palette(3)
  assert colours[0].tolist() == [0, 0, 0] and len({tuple(c) for c in colours}) == 3
  image = np.full((2, 2, 3), 100, np.uint8)
  mask = np.array([[0, 1], [2, 0]], np.uint8)
  out = predict.overlay(image, mask, colours, alpha=0.5)
  assert out[0, 0].tolist() == [100, 100, 100]
  np.testing.assert_array_equal(out[0, 1], np.round(0.5 * 100 + 0.5 * colours[1]))
