"""Preprocessing numbers: normalisation, centre crop, crop shapes, seeds."""
import numpy as np
import tensorflow as tf

from tlflax.data import preprocess

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def _config(**overrides):
  from tlflax import data  # pylint: disable=g-import-not-at-top
  config = data.default_config()
  config.update(overrides)
  return config


def test_constant_colour_normalises_to_expected_value():
  colour = np.array([200, 100, 30], np.uint8)
  image = np.broadcast_to(colour, (40, 60, 3))
  expected = (colour / 255.0 - np.array(MEAN)) / np.array(STD)
  config = _config(image_size=24)
  train = preprocess.train_transform(config, MEAN, STD)
  for transform in (preprocess.eval_transform(config, MEAN, STD),
                    lambda ex: train(ex, tf.constant([1, 2]))):
    out = transform({"image": tf.constant(image), "label": 3})
    assert out["image"].dtype == tf.float32
    assert out["image"].shape == (24, 24, 3)
    np.testing.assert_allclose(
        out["image"].numpy(), np.broadcast_to(expected, (24, 24, 3)),
        atol=1e-5)
    assert out["label"].dtype == tf.int32 and int(out["label"]) == 3


def test_eval_center_crop_takes_the_centre_of_a_gradient():
  # 16 x 32 image whose value is 8 * column; shorter side already 16.
  image = np.broadcast_to((np.arange(32) * 8).astype(np.uint8)[None, :, None],
                          (16, 32, 3))
  transform = preprocess.eval_transform(
      _config(image_size=16, resize_size=16), (0, 0, 0), (1, 1, 1))
  out = transform({"image": tf.constant(image), "label": 0})["image"].numpy()
  np.testing.assert_allclose(out[0, :, 0] * 255, np.arange(8, 24) * 8,
                             atol=1e-3)


def test_eval_resize_then_crop_keeps_the_middle():
  # 64 x 128, left half black, right half white; after shorter side -> 32 and a
  # centre 32 x 32 crop the middle column of the crop is the boundary.
  image = np.zeros((64, 128, 3), np.uint8)
  image[:, 64:] = 255
  transform = preprocess.eval_transform(
      _config(image_size=32, resize_size=32), (0, 0, 0), (1, 1, 1))
  out = transform({"image": tf.constant(image), "label": 0})["image"].numpy()
  assert out.shape == (32, 32, 3)
  np.testing.assert_allclose(out[:, :15], 0, atol=1e-6)
  np.testing.assert_allclose(out[:, 17:], 1, atol=1e-6)


def test_default_resize_size_is_image_size_over_0875():
  assert preprocess.eval_resize_size(224) == 256
  assert preprocess.eval_resize_size(32) == 37


def test_random_resized_crop_shape_and_determinism():
  image = tf.constant(np.random.default_rng(0).integers(0, 256, (50, 70, 3)),
                      tf.uint8)
  a = preprocess.random_resized_crop(image, tf.constant([1, 2]), 24)
  b = preprocess.random_resized_crop(image, tf.constant([1, 2]), 24)
  crops = [preprocess.random_resized_crop(image, tf.constant([s, 0]), 24)
           for s in range(5)]
  assert a.shape == (24, 24, 3) and a.dtype == tf.float32
  np.testing.assert_array_equal(a.numpy(), b.numpy())
  assert len({c.numpy().tobytes() for c in crops}) > 1


def test_decode_image_makes_grey_rgb():
  grey = tf.io.encode_png(tf.fill([5, 7, 1], tf.constant(9, tf.uint8)))
  image = preprocess.decode_image(grey)
  assert image.shape == (5, 7, 3) and image.dtype == tf.uint8
  np.testing.assert_array_equal(image.numpy(), 9)
