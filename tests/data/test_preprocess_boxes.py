"""Detection preprocessing: boxes stay on the pixels they mark under every op.

Solid boxes of distinct colours are drawn into a grey image; after a
transform, the pixels that still have box k's colour must lie inside box k's
transformed coordinates and reach to within 1.5 px of each of its edges
(edge pixels blend with grey).
"""
import numpy as np
import pytest
import tensorflow as tf

from tlflax import data
from tlflax.data import preprocess_boxes

UNIT = ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))  # mean/std keeping x / 255.
COLOURS = np.array([[250, 10, 10], [10, 250, 10], [10, 10, 250],
                    [250, 250, 10]], np.uint8)
GREY = 128
# (x1, y1, x2, y2) in original pixels, apart by >= 6 px so blends stay grey.
BOXES = np.array([[4, 6, 30, 40], [40, 10, 90, 30], [60, 50, 116, 86],
                  [8, 60, 36, 84]], np.float32)


def _config(**overrides):
  config = data.default_config()
  config.update(dict(image_size=64, max_boxes=6, min_box_size=1.0,
                     box_scale_range=(0.75, 1.25)))
  config.update(overrides)
  return config


def _image(height=90, width=120, boxes=BOXES):
  image = np.full((height, width, 3), GREY, np.uint8)
  for k, (x1, y1, x2, y2) in enumerate(boxes.astype(int)):
    image[y1:y2, x1:x2] = COLOURS[k]
  return image


def _example(image, boxes=BOXES, classes=None, crowd=None):
  classes = np.arange(len(boxes)) if classes is None else classes
  example = {"image": tf.constant(image), "boxes": tf.constant(boxes),
             "classes": tf.constant(classes, tf.int32),
             "image_id": tf.constant(7, tf.int32)}
  if crowd is not None:
    example["crowd"] = tf.constant(crowd)
  return example


def _colour_extent(image01: np.ndarray, colour: np.ndarray):
  """(x1, y1, x2, y2) spanned by pixels of `colour` (continuous), or None."""
  close = np.abs(image01 * 255.0 - colour).max(axis=-1) < 12
  rows, cols = np.nonzero(close)
  if not len(rows):
    return None
  return np.array([cols.min(), rows.min(), cols.max() + 1, rows.max() + 1],
                  np.float32), int(close.sum())


def _valid(out):
  keep = out["classes"] >= 0
  return out["boxes"][keep], out["classes"][keep]


def _assert_on_their_colours(out, size):
  image = out["image"]
  boxes, classes = _valid(out)
  for box, cls in zip(boxes, classes):
    extent, _ = _colour_extent(image, COLOURS[cls])
    # Pure colour lies inside the box, and reaches to within 1.5 px of its
    # edges (an edge pixel mixes with grey; shrinking blurs by <= 1 px).
    inward = np.concatenate([extent[:2] - box[:2], box[2:] - extent[2:]])
    assert (inward >= -0.5).all() and (inward <= 1.5).all(), (cls, extent,
                                                               box)
    assert 0 <= box[0] < box[2] <= size and 0 <= box[1] < box[3] <= size
  return classes


def _run(fn, *args):
  return {k: v.numpy() for k, v in fn(*args).items()}


@pytest.mark.parametrize("height,width,boxes", [
    (90, 120, BOXES),  # Shrunk (antialiased).
    (45, 60, BOXES / 2),  # Enlarged.
    (120, 90, BOXES[:, [1, 0, 3, 2]]),  # Portrait: padded on the right.
])
def test_eval_boxes_cover_their_colours_and_map_back(height, width, boxes):
  image = _image(height, width, boxes)
  fn = preprocess_boxes.eval_transform(_config(), *UNIT)
  out = _run(fn, _example(image, boxes))
  scale = 64 / max(height, width)
  assert out["scale"] == pytest.approx(scale)
  np.testing.assert_array_equal(out["orig_size"], [height, width])
  assert out["image_id"] == 7 and out["image"].shape == (64, 64, 3)
  classes = _assert_on_their_colours(out, 64)
  np.testing.assert_array_equal(classes, np.arange(4))
  np.testing.assert_allclose(out["boxes"][:4] / out["scale"], boxes,
                             rtol=1e-5, atol=1e-4)
  np.testing.assert_array_equal(out["classes"][4:], -1)
  assert (out["boxes"][4:] == 0).all()
  fitted = (round(height * scale), round(width * scale))
  assert (out["image"][fitted[0]:] == 0).all()  # Bottom/right padding only.
  assert (out["image"][:, fitted[1]:] == 0).all()
  assert (out["image"][:fitted[0], :fitted[1]] > 0).all()
  alone, alone_scale = preprocess_boxes.fit_image(image, 64, *UNIT)  # Predict.
  np.testing.assert_array_equal(alone.numpy(), out["image"])
  assert alone_scale.numpy() == out["scale"]


def test_train_boxes_cover_their_colours_under_jitter_crop_and_flip():
  """Kept boxes span their colour; a box is dropped only if little is left.

  Jitter u is in [0.6, 1.8], so box k's area is at most A_k = its area at
  the fit scale times 1.8^2: a colour with >= 0.3 A_k pixels visible must be
  kept, a dropped one shows < 0.3 A_k (pixels of one colour lie inside the
  clipped box).
  """
  fn = preprocess_boxes.train_transform(_config(box_scale_range=(0.6, 1.8)),
                                        *UNIT)
  most = (BOXES[:, 2:] - BOXES[:, :2]).prod(1) * (64 / 120 * 1.8) ** 2
  kept_counts, flips, crops = [], 0, 0
  for seed in range(16):
    out = _run(fn, _example(_image()), tf.constant([seed, 3], tf.int64))
    assert out["image"].shape == (64, 64, 3) and out["boxes"].shape == (6, 4)
    classes = _assert_on_their_colours(out, 64)
    kept_counts.append(len(classes))
    for cls in range(4):
      visible = _colour_extent(out["image"], COLOURS[cls])
      count = 0 if visible is None else visible[1]
      if count >= 0.3 * most[cls]:  # Equivalently: dropped -> count small.
        assert cls in classes, (seed, cls, count)
    red = _colour_extent(out["image"], COLOURS[0])
    flips += red is not None and red[0][0] > 20  # Red starts at the left.
    crops += not (out["image"][:, -1] == 0).all()  # Wider than 64: cropped.
  assert 0 < flips < 16 and 0 < crops < 16  # Both ops ran, both ways.
  assert min(kept_counts) < 4 == max(kept_counts)


def test_dropped_boxes_are_the_ones_mostly_cut_away():
  """A window that cuts box 2 to a sliver drops it, a box cut in half stays."""
  scaled = preprocess_boxes.scale_image(_image(), 1.0)
  np.testing.assert_array_equal(scaled.numpy(), _image())  # Scale 1: a copy.
  boxes = tf.constant(BOXES)
  win, shifted, clipped = preprocess_boxes.window(
      scaled, boxes, tf.constant([0, 0]), 100)  # x up to 100: box 2 = 60..100.
  keep = preprocess_boxes.keep_mask(shifted, clipped, 1.0, 0.3).numpy()
  np.testing.assert_array_equal(keep, [True, True, True, True])  # 40/56 left.
  win, shifted, clipped = preprocess_boxes.window(
      scaled, boxes, tf.constant([0, 0]), 70)  # Box 2: 10 of 56 px wide left.
  keep = preprocess_boxes.keep_mask(shifted, clipped, 1.0, 0.3).numpy()
  np.testing.assert_array_equal(keep, [True, True, False, True])
  np.testing.assert_allclose(clipped.numpy()[1], [40, 10, 70, 30])
  assert win.shape == (70, 70, 3)


def test_flip_twice_is_identity():
  rng = np.random.default_rng(0)
  corners = rng.uniform(0, 50, (20, 2, 2)).astype(np.float32)
  boxes = np.concatenate([corners.min(1), corners.max(1)], -1)
  once = preprocess_boxes.flip_boxes(tf.constant(boxes), 50).numpy()
  np.testing.assert_allclose(once[:, [0, 2]], 50 - boxes[:, [2, 0]])
  np.testing.assert_array_equal(once[:, [1, 3]], boxes[:, [1, 3]])
  twice = preprocess_boxes.flip_boxes(tf.constant(once), 50).numpy()
  np.testing.assert_allclose(twice, boxes, atol=1e-5)
  image = tf.constant(_image(), tf.float32)
  seed = next(tf.constant([s, 0], tf.int64) for s in range(20) if
              tf.random.stateless_uniform([], tf.constant([s, 0], tf.int64))
              < 0.5)  # A seed that flips.
  flipped, fboxes = preprocess_boxes.random_flip(image, tf.constant(BOXES),
                                                 seed)
  assert not np.array_equal(flipped.numpy(), image.numpy())
  extent, _ = _colour_extent(flipped.numpy() / 255, COLOURS[1])
  np.testing.assert_allclose(extent, fboxes.numpy()[1])
  back, bboxes = preprocess_boxes.random_flip(flipped, fboxes, seed)
  np.testing.assert_array_equal(back.numpy(), image.numpy())
  np.testing.assert_allclose(bboxes.numpy(), BOXES)


def test_no_box_leaves_the_image_or_degenerates():
  rng = np.random.default_rng(1)
  config = _config(image_size=48, max_boxes=40, min_box_size=0.0,
                   box_scale_range=(0.5, 2.0))
  train = preprocess_boxes.train_transform(config, *UNIT)
  evaluate = preprocess_boxes.eval_transform(config, *UNIT)
  for seed in range(12):
    height, width = rng.integers(20, 160, 2)
    corners = rng.uniform(0, 1, (30, 2, 2)) * [width, height]
    boxes = np.concatenate([corners.min(1), corners.max(1)], -1)
    boxes[:3, 2] = boxes[:3, 0]  # Zero width: must be dropped.
    example = _example(np.zeros((height, width, 3), np.uint8),
                       boxes.astype(np.float32), rng.integers(0, 3, 30))
    for out in (_run(train, example, tf.constant([seed, 1], tf.int64)),
                _run(evaluate, example)):
      valid, _ = _valid(out)
      assert (valid[:, 2] > valid[:, 0]).all()
      assert (valid[:, 3] > valid[:, 1]).all()
      assert valid.min(initial=0) >= 0 and valid.max(initial=0) <= 48
    assert len(_valid(out)[0]) == 27  # Eval keeps all non-degenerate boxes.


def test_crowd_boxes_min_size_and_max_boxes():
  image = _image()
  crowd = np.array([False, True, False, False])
  fn = preprocess_boxes.eval_transform(_config(max_boxes=2), *UNIT)
  out = _run(fn, _example(image, crowd=crowd))
  np.testing.assert_array_equal(out["classes"], [0, 2])  # 1 crowd, 3 trimmed.
  fn = preprocess_boxes.eval_transform(_config(min_box_size=13.0), *UNIT)
  out = _run(fn, _example(image))  # Shorter sides: 13.9, 10.7, 19.2, 12.8.
  np.testing.assert_array_equal(out["classes"], [0, 2, -1, -1, -1, -1])
  no_boxes = _example(image, np.zeros((0, 4), np.float32), np.zeros(0))
  out = _run(preprocess_boxes.train_transform(_config(), *UNIT), no_boxes,
             tf.constant([0, 0], tf.int64))
  assert (out["classes"] == -1).all() and (out["boxes"] == 0).all()


def test_same_seed_same_output_and_bad_config():
  fn = preprocess_boxes.train_transform(_config(), *UNIT)
  example, seed = _example(_image()), tf.constant([5, 2], tf.int64)
  a, b = _run(fn, example, seed), _run(fn, example, seed)
  for key in a:
    np.testing.assert_array_equal(a[key], b[key])
  with pytest.raises(ValueError, match="box_scale_range"):
    preprocess_boxes.train_transform(_config(box_scale_range=(1.2, 0.8)),
                                     *UNIT)
  with pytest.raises(ValueError, match="max_boxes"):
    preprocess_boxes.eval_transform(_config(max_boxes=0), *UNIT)
