"""BiT-HyperRule preset: resolution, schedule, lr scaling and MixUp from the dataset."""
import numpy as np
import pytest
import tensorflow as tf

from tlflax import config as config_lib
from tlflax import optim, presets
from tlflax.data import preprocess
from tests.conftest import shared_data


def digits_config(batch=32):
  c = config_lib.base_config()
  c.data.name = "digits"
  c.batch_size = batch
  return c


def test_bit_rules_by_dataset_size_and_area():
  assert presets.bit_schedule(1_000) == (100, 200, 300, 400, 500)
  assert presets.bit_schedule(20_000) == (500, 3_000, 6_000, 9_000, 10_000)
  assert presets.bit_schedule(500_000)[-1] == 20_000
  assert presets.bit_resolution((32, 32)) == (160, 128)
  assert presets.bit_resolution((96, 96)) == (512, 480)
  c = presets.bit_hyperrule(digits_config(), num_train=50_000, image_hw=(224, 224))
  assert (c.mixup.mixup_alpha, c.total_steps, c.data.image_size) == (0.1, 10_000, 480)


def test_bit_on_digits_reads_size_and_resolution_and_gives_the_staircase():
  c = presets.bit_hyperrule(digits_config(batch=32))
  assert (c.data.resize_size, c.data.image_size, c.total_steps) == (160, 128, 500)
  assert c.mixup.mixup_alpha == 0.0 and c.optim.name == "momentum"
  lr = 0.003 * 32 / 512
  assert c.optim.lr == pytest.approx(lr)
  schedule = optim.make_schedule(c.optim, c.total_steps)
  np.testing.assert_allclose([schedule(s) for s in (50, 150, 250, 350, 450)],
                             [lr / 2, lr, lr / 10, lr / 100, lr / 1000], rtol=1e-5)


def test_bit_on_real_photos_picks_the_large_resolution():
  c = config_lib.base_config()
  c.data.name, c.data.root = "folder", str(shared_data("hymenoptera"))
  c.data.verify_images = False
  c = presets.bit_hyperrule(c)
  assert (c.data.resize_size, c.data.image_size, c.total_steps) == (512, 480, 500)


def test_resize_random_crop_is_a_window_of_the_square_resize():
  c = config_lib.base_config().data
  c.image_size, c.resize_size, c.train_crop, c.flip = 6, 10, "resize_random_crop", False
  image = tf.constant(np.random.RandomState(0).randint(0, 255, (13, 17, 3)), tf.uint8)
  out = preprocess.train_transform(c, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))(
      {"image": image, "label": 0}, tf.constant([1, 2], tf.int64))["image"].numpy() * 255.0
  resized = preprocess.resize(image, 10, 10).numpy()
  windows = [resized[y:y + 6, x:x + 6] for y in range(5) for x in range(5)]
  assert min(np.abs(w - out).max() for w in windows) < 1e-3
  c.resize_size = 4
  with pytest.raises(ValueError, match="resize_size >= "):
    preprocess.train_transform(c, (0.0,) * 3, (1.0,) * 3)
