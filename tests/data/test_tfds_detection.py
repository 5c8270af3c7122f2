"""voc/2007, voc/2012 and coco/2017 through the real TFDS builders, mocked.

`tfds.testing.mock_data`'s stock generator cannot make a detection example:
it draws each object field's length on its own (bbox 27 objects, label 33)
and box corners unordered, both of which TFDS's own encoder rejects. The
generator is therefore given one object count per example (its
`constant_dynamic_shape` mode: 10 objects, 10 x 10 images) and sorted
corners; everything else (labels, crowd flags, pixels) is the mock's random
data, read through `tfds.load` with the builder's own features. The boxes
are random, so this checks plumbing (conversion, batching, ids, resume), not
box semantics: those are checked on real files in test_detection.py.
"""
import itertools
from unittest import mock

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from tensorflow_datasets.testing import mocking

from tlflax import data
from tlflax.data import detection

SIZE = 32


class _ValidBoxes(mocking.EncodedRandomFakeGenerator):
  """The mock's random examples with consistent lengths and sorted corners."""

  def __init__(self, *args, **kwargs):
    super().__init__(*args, constant_dynamic_shape=True, **kwargs)

  def _generate_random_obj(self, feature, tensor_info, rng):
    value = super()._generate_random_obj(feature, tensor_info, rng)
    if isinstance(feature, tfds.features.BBoxFeature):  # (ymin, xmin, ...)
      value = np.sort(value.reshape(-1, 2, 2), axis=1).reshape(-1, 4)
    return value


def _mocked(num_examples):
  stack = mock.patch.object(mocking, "EncodedRandomFakeGenerator",
                            _ValidBoxes)
  return tfds.testing.mock_data(num_examples=num_examples), stack


def _config(name, **overrides):
  config = data.default_config()
  config.name = name
  config.image_size = SIZE
  config.max_boxes = 12
  config.update(overrides)
  return config


def _expected(row, one_based):
  """The row's boxes converted by hand: xyxy pixels, clipped, degenerate out."""
  height, width = tf.io.decode_image(row["image"]).shape[:2]
  ymin, xmin, ymax, xmax = row["bbox"].numpy().T
  shift = 1.0 if one_based else 0.0
  boxes = np.stack([xmin * width - shift, ymin * height - shift,
                    xmax * width, ymax * height], 1)
  boxes = np.clip(boxes, 0, [width, height, width, height])
  keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
  return boxes[keep], row["label"].numpy()[keep], row["crowd"].numpy()[keep]


@pytest.mark.parametrize("name,num_classes", [
    ("voc/2007", 20), ("voc/2012", 20), ("coco/2017", 80)])
def test_mock_examples_flow_into_batches(name, num_classes):
  mocked, patched = _mocked(num_examples=5)
  with mocked, patched:
    pipe = data.build(_config(name), batch_size=2, eval_batch_size=4)
    assert pipe.label_kind == "boxes" and len(pipe.class_names) == num_classes
    assert (pipe.num_train, pipe.num_eval) == (5, 5)
    records = pipe.source.eval_records
    rows = list(records.stream)
    spec = detection.TFDS_DETECTION[name]
    for index, row in enumerate(rows):
      example = {k: v.numpy() for k, v in records.decode(row).items()}
      boxes, classes, crowd = _expected(row, spec.one_based)
      np.testing.assert_allclose(example["boxes"], boxes, rtol=1e-6)
      np.testing.assert_array_equal(example["classes"], classes)
      np.testing.assert_array_equal(example["crowd"], crowd)
      assert example["image_id"] == index and example["image"].shape == (
          10, 10, 3)
    batches = list(pipe.eval_batches())
    train = next(pipe.train_batches())
  assert len(batches) == 2
  mask = np.concatenate([b["mask"] for b in batches])
  np.testing.assert_array_equal(mask, np.repeat([1.0, 0.0], [5, 3]))
  ids = np.concatenate([b["image_id"] for b in batches])
  np.testing.assert_array_equal(ids, [0, 1, 2, 3, 4, -1, -1, -1])
  first = batches[0]
  assert first["image"].shape == (4, SIZE, SIZE, 3)
  assert first["boxes"].shape == (4, 12, 4)
  assert first["classes"].shape == (4, 12)
  np.testing.assert_allclose(first["scale"], SIZE / 10)
  np.testing.assert_array_equal(first["orig_size"], [[10, 10]] * 4)
  boxes, classes, crowd = _expected(rows[0], spec.one_based)
  valid = first["classes"][0] >= 0
  assert 0 < valid.sum() == min((~crowd).sum(), 12)
  np.testing.assert_allclose(first["boxes"][0][valid] / first["scale"][0],
                             boxes[~crowd][:12], rtol=1e-5, atol=1e-4)
  np.testing.assert_array_equal(first["classes"][0][valid],
                                classes[~crowd][:12])
  assert train["image"].shape == (2, SIZE, SIZE, 3)
  assert train["boxes"].shape == (2, 12, 4) and (train["classes"] >= 0).any()
  real = train["boxes"][train["classes"] >= 0]
  assert (real[:, 2:] > real[:, :2]).all() and real.max() <= SIZE


def test_stream_resume_is_exact_and_ground_truth_counts():
  mocked, patched = _mocked(num_examples=6)
  with mocked, patched:
    pipe = data.build(_config("voc/2007", shuffle_buffer=4), batch_size=2,
                      eval_batch_size=4, seed=1)
    fresh = list(itertools.islice(pipe.train_batches(), 5))  # 3 per epoch.
    for k in (1, 4):
      resumed = next(pipe.train_batches(start_step=k))
      for key in resumed:
        np.testing.assert_array_equal(resumed[key], fresh[k][key])
    gt = data.coco_ground_truth(pipe)
    rows = list(pipe.source.eval_records.stream)
  assert [im["id"] for im in gt["images"]] == list(range(6))
  assert gt["images"][0] == {"id": 0, "width": 10, "height": 10}
  expected = [_expected(row, True) for row in rows]
  assert len(gt["annotations"]) == sum(len(b) for b, _, _ in expected)
  assert sum(a["iscrowd"] for a in gt["annotations"]) == sum(
      c.sum() for _, _, c in expected)
  assert [a["id"] for a in gt["annotations"]] == list(
      range(1, len(gt["annotations"]) + 1))


def test_tfds_boxes_by_hand():
  # TFDS VOC: the XML's 1-based corners over the size, (ymin, xmin, ...).
  # Abyssinian_100: 394x500, xmin 151 ymin 71 xmax 335 ymax 267.
  voc = tf.constant([[71 / 500, 151 / 394, 267 / 500, 335 / 394]])
  np.testing.assert_allclose(
      detection.tfds_boxes(voc, tf.constant([500, 394]), True).numpy(),
      [[150, 70, 335, 267]], rtol=1e-6)
  # TFDS COCO: [x, y, w, h] = [2.5, 3, 10, 20] on 40x30, 0-based already.
  coco = tf.constant([[3 / 30, 2.5 / 40, 23 / 30, 12.5 / 40]])
  np.testing.assert_allclose(
      detection.tfds_boxes(coco, tf.constant([30, 40]), False).numpy(),
      [[2.5, 3, 12.5, 23]], rtol=1e-6)
