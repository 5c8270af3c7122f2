"""`tlflax.export`: serialized StableHLO / SavedModel round trips equal the JAX model."""
import json

import jax
import numpy as np
import pytest
from PIL import Image
from skimage import data as skimage_data

from tests.test_predict import trained_workdir  # noqa: F401  (the module-scoped fixture)
from tlflax import export, models, predict


def photos(size):
  """Two real photos, resized to the model's input size, uint8 [2, size, size, 3]."""
  return np.stack([np.asarray(Image.fromarray(getattr(skimage_data, name)()).resize(
      (size, size), Image.BILINEAR)) for name in ("chelsea", "coffee")])


def rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / np.linalg.norm(b)


def normalised(images, model):
  return ((images / 255.0 - np.asarray(model.mean)) / np.asarray(model.std)).astype(np.float32)


def test_classification_round_trip_on_real_photos(trained_workdir, tmp_path):  # noqa: F811
  out = tmp_path / "export"
  meta = export.export(export.Servable.from_workdir(str(trained_workdir)), str(out))
  model = predict.TrainedModel(str(trained_workdir))
  saved = json.loads((out / "metadata.json").read_text())
  assert saved["task"] == "classification" and saved["class_names"] == model.class_names
  assert saved["input"]["shape"] == ["b", 32, 32, 3] and saved["input"]["dtype"] == "uint8"
  np.testing.assert_allclose(saved["preprocessing_folded_in"]["mean"], model.mean, rtol=1e-7)
  np.testing.assert_allclose(saved["preprocessing_folded_in"]["std"], model.std, rtol=1e-7)
  assert saved["outputs"] == {"logits": ["B", 10], "probabilities": ["B", 10]}
  assert saved["step"] == 2 and saved["jax_export"]["symbolic_batch"]
  images = photos(model.image_size)
  reference = np.asarray(model(normalised(images, model)))
  exported = export.load_exported(str(out / "model.jax_export"))
  got = exported.call(images)
  assert rel_err(got["logits"], reference) < 1e-5
  np.testing.assert_allclose(np.asarray(got["probabilities"]).sum(-1), 1.0, rtol=1e-6)
  # The batch is symbolic: one image runs through the same artifact.
  assert rel_err(exported.call(images[1:])["logits"], reference[1:]) < 1e-5
  assert meta["saved_model"]["written"], meta["saved_model"]  # jax2tf works in jax 0.10.2.
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  serve = tf.saved_model.load(str(out / "saved_model")).signatures["serving_default"]
  tf_out = serve(images=tf.constant(images))
  assert rel_err(tf_out["logits"].numpy(), reference) < 1e-5
  assert rel_err(serve(images=tf.constant(images[:1]))["logits"].numpy(), reference[:1]) < 1e-5


def test_float_input_and_fixed_batch(trained_workdir, tmp_path):  # noqa: F811
  model = export.Servable.from_workdir(str(trained_workdir))
  meta = export.export(model, str(tmp_path), input_dtype="float32", batch_size=2,
                       saved_model=False)
  assert meta["input"]["shape"] == [2, 32, 32, 3] and not meta["jax_export"]["symbolic_batch"]
  assert meta["saved_model"] == {"written": False, "reason": "not requested (--nosaved_model)"}
  images = photos(32).astype(np.float32)
  got = export.load_exported(str(tmp_path / "model.jax_export")).call(images)
  reference = model.module.apply(model.variables, normalised(images, model))
  assert rel_err(got["logits"], reference) < 1e-5


def tiny_servable(task, **kwargs):
  common = dict(num_classes=3, pretrained_backbone=False, width_mult=0.25)
  if task == "segmentation":
    module, variables = models.create_segmentation_model("fcn", "mobilenet_v2", **common)
    size = 32
  else:
    size = 64
    module, variables = models.create_detection_model("retinanet", "mobilenet_v2",
                                                      image_size=size, fpn_channels=16, **common)
  return export.Servable(module, variables, task, ["a", "b", "c"], size, [0.5, 0.4, 0.3],
                         [0.2, 0.25, 0.3])


@pytest.mark.parametrize("task", ["segmentation", "detection"])
def test_segmentation_and_detection_export_their_raw_outputs(task, tmp_path):
  model = tiny_servable(task)
  meta = export.export(model, str(tmp_path), saved_model=False)
  images = np.random.RandomState(0).randint(0, 256, (2, model.image_size, model.image_size, 3))
  images = images.astype(np.uint8)
  got = export.load_exported(str(tmp_path / "model.jax_export")).call(images)
  reference = model.module.apply(model.variables, normalised(images, model))
  if task == "segmentation":
    assert meta["outputs"] == {"logits": ["B", 32, 32, 3]}
    assert rel_err(got["logits"], reference["out"]) < 1e-5
  else:
    assert "NMS" in meta["detection_note"]
    flat_got, flat_ref = jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(reference)
    assert len(flat_got) == len(flat_ref) == len(meta["outputs"])
    for a, b in zip(flat_got, flat_ref):
      assert rel_err(a, b) < 1e-5


def test_unknown_task_and_dtype_fail_clearly(tmp_path):
  model = export.Servable(None, None, "keypoints", [], 32, [0, 0, 0], [1, 1, 1])
  with pytest.raises(ValueError, match="Task 'keypoints' has no export"):
    export.serving_function(model)
  model.task = "classification"
  with pytest.raises(ValueError, match="input_dtype='int16'"):
    export.input_spec(model, "int16", None)
  with pytest.raises(FileNotFoundError, match="config.json is missing"):
    export.Servable.from_workdir(str(tmp_path))
