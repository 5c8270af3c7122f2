"""Segmentation preprocessing: image and mask stay aligned under every op."""
import numpy as np
import pytest
import tensorflow as tf

from tlflax.data import preprocess_masks

IGNORE = 255
# Class c is drawn in COLOURS[c]; none is black, the colour of padding.
COLOURS = np.array([[250, 10, 10], [10, 250, 10], [10, 10, 250],
                    [250, 250, 10]], np.uint8)
UNIT = ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))  # mean/std keeping x / 255.


def _config(**overrides):
  from tlflax import data  # pylint: disable=g-import-not-at-top
  config = data.default_config()
  config.update(dict(image_size=32, ignore_index=IGNORE))
  config.update(overrides)
  return config


def _blocks(height=40, width=56, block=8, seed=0):
  """A mask of random classes in block x block squares, and its colour image."""
  rng = np.random.default_rng(seed)
  cells = rng.integers(0, len(COLOURS), (height // block, width // block))
  mask = np.kron(cells, np.ones((block, block), np.int64)).astype(np.uint8)
  return COLOURS[mask], mask


def _coordinates(height, width):
  """An image whose pixels spell their (row, column); the mask, row*W + col."""
  rows, cols = np.mgrid[:height, :width]
  image = np.stack([rows, cols, np.zeros_like(rows)], -1).astype(np.uint8)
  return image, (rows * width + cols).astype(np.int32)


def _interior(label: np.ndarray, radius: int) -> np.ndarray:
  """Pixels whose (2r+1)^2 neighbourhood has one label (no blending there).

  Pixels within r of the border are never interior: what lies beyond the
  crop is unknown.
  """
  height, width = label.shape
  padded = np.pad(label.astype(np.int64), radius, constant_values=-1)
  same = np.ones_like(label, bool)
  for dy in range(2 * radius + 1):
    for dx in range(2 * radius + 1):
      same &= padded[dy:dy + height, dx:dx + width] == label
  return same


def _check_aligned(image01, label, min_interior=0.25):
  """Every non-ignored pixel away from a class edge has its class's colour.

  Radius 1 suffices: the antialiased bilinear kernel reaches one output pixel
  either side when shrinking, less when enlarging, and classes are blocks of
  at least 2 output pixels (8 px at the smallest scale, 0.25).
  """
  real = label != IGNORE
  interior = _interior(label, 1) & real
  assert interior.mean() > min_interior * real.mean()  # Not a vacuous check.
  expected = COLOURS[np.where(real, label, 0)] / 255.0
  np.testing.assert_allclose(image01[interior], expected[interior], atol=2e-3)
  # Padding (the only ignored pixels here) is exactly 0, the mean colour.
  np.testing.assert_array_equal(image01[~real], 0.0)
  assert (np.abs(image01[real]).sum(-1) > 0.1).all()


def test_train_transform_keeps_image_and_mask_aligned():
  image, mask = _blocks()
  transform = preprocess_masks.train_transform(_config(), *UNIT)
  padded = 0
  for seed in range(24):
    out = transform({"image": tf.constant(image), "label": tf.constant(mask)},
                    tf.constant([seed, 7]))
    label, out_image = out["label"].numpy(), out["image"].numpy()
    assert out["label"].dtype == tf.int32 and label.shape == (32, 32)
    assert out["image"].dtype == tf.float32 and out_image.shape == (32, 32, 3)
    _check_aligned(out_image, label)
    padded += (label == IGNORE).any()
  assert 0 < padded < 24  # Scales below and above 1 both happened.


def test_nearest_never_invents_labels():
  image, mask = _blocks(seed=1)
  odd_values = np.array([3, 7, 200, 9], np.uint8)[mask]  # Any raw integers.
  config = _config(scale_range=(0.3, 2.5))
  train = preprocess_masks.train_transform(config, *UNIT)
  evaluation = preprocess_masks.eval_transform(config, *UNIT)
  example = {"image": tf.constant(image), "label": tf.constant(odd_values)}
  outs = [train(example, tf.constant([s, 0]))["label"] for s in range(10)]
  outs.append(evaluation(example)["label"])
  for label in outs:
    assert set(np.unique(label.numpy())) <= {3, 7, 200, 9, IGNORE}


def test_crop_and_flip_move_image_and_mask_together():
  """No resizing (scale 1 on a square image): positions must match exactly."""
  image, coords = _coordinates(32, 32)
  transform = preprocess_masks.train_transform(
      _config(image_size=20, scale_range=(1.6, 1.6)), *UNIT)
  # Shorter side 32 = 1.6 * 20: the image keeps its size, then a 20 x 20 crop.
  flipped = 0
  for seed in range(16):
    out = transform({"image": tf.constant(image), "label": tf.constant(coords)},
                    tf.constant([seed, 3]))
    pixels = np.round(out["image"].numpy() * 255).astype(np.int64)
    label = out["label"].numpy()
    np.testing.assert_array_equal(pixels[..., 0] * 32 + pixels[..., 1], label)
    columns = label % 32
    step = np.unique(np.diff(columns, axis=1))
    assert len(step) == 1 and abs(step[0]) == 1  # A contiguous window.
    flipped += step[0] == -1
  assert 0 < flipped < 16


def test_padding_is_mean_colour_and_ignore():
  image, mask = _blocks()
  mean = (0.2, 0.4, 0.6)
  transform = preprocess_masks.train_transform(
      _config(scale_range=(0.5, 0.5), flip=False), mean, (0.5, 0.5, 0.5))
  out = transform({"image": tf.constant(image), "label": tf.constant(mask)},
                  tf.constant([0, 0]))
  label, out_image = out["label"].numpy(), out["image"].numpy()
  # Shorter side 40 -> 16 (0.5 * 32), longer 56 -> 22: rows 16.. are padding.
  assert (label[16:] == IGNORE).all() and (label[:16, :22] != IGNORE).all()
  assert (label[:, 22:] == IGNORE).all()
  np.testing.assert_array_equal(out_image[16:], 0.0)
  np.testing.assert_array_equal(out_image[:, 22:], 0.0)


def test_resize_mask_is_nearest_with_half_pixel_centres():
  _, coords = _coordinates(10, 15)
  out = preprocess_masks.resize_mask(tf.constant(coords), 4, 6).numpy()
  rows = np.floor((np.arange(4) + 0.5) * 10 / 4).astype(int)
  cols = np.floor((np.arange(6) + 0.5) * 15 / 6).astype(int)
  np.testing.assert_array_equal(out, coords[rows][:, cols])
  up = preprocess_masks.resize_mask(tf.constant(coords), 20, 30).numpy()
  np.testing.assert_array_equal(up, np.repeat(np.repeat(coords, 2, 0), 2, 1))


def test_eval_transform_resizes_both_to_the_square():
  image, mask = _blocks(height=48, width=64, block=16)
  out = preprocess_masks.eval_transform(_config(), *UNIT)(
      {"image": tf.constant(image), "label": tf.constant(mask)})
  label = out["label"].numpy()
  assert label.shape == (32, 32) and out["image"].shape == (32, 32, 3)
  rows = np.floor((np.arange(32) + 0.5) * 48 / 32).astype(int)
  cols = np.floor((np.arange(32) + 0.5) * 64 / 32).astype(int)
  np.testing.assert_array_equal(label, mask[rows][:, cols])
  _check_aligned(out["image"].numpy(), label)


def test_same_seed_same_output_other_seed_differs():
  image, mask = _blocks()
  transform = preprocess_masks.train_transform(_config(), *UNIT)
  example = {"image": tf.constant(image), "label": tf.constant(mask)}
  a, b, c = (transform(example, tf.constant(s)) for s in ([1, 2], [1, 2],
                                                          [2, 2]))
  for key in a:
    np.testing.assert_array_equal(a[key].numpy(), b[key].numpy())
  assert not np.array_equal(a["image"].numpy(), c["image"].numpy())


def test_bad_scale_range_is_named():
  with pytest.raises(ValueError, match="scale_range"):
    preprocess_masks.train_transform(_config(scale_range=(2.0, 0.5)), *UNIT)
