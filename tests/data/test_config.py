"""default_config has every field, and placeholders type-check overrides."""
import pytest

from tlflax import data

FIELDS = ("name", "root", "train_split", "eval_split", "image_size",
          "resize_size", "train_crop", "eval_crop", "crop_scale", "flip",
          "extensions", "verify_images", "strict", "cache", "shuffle_buffer",
          "tfds_data_dir", "split_seed", "masks_dir", "class_names",
          "mask_map", "ignore_index", "scale_range", "tfds_manual_dir")


def test_default_config_has_every_field():
  config = data.default_config()
  for field in FIELDS:
    assert field in config, field
  assert config.image_size == 224
  assert config.resize_size is None
  assert tuple(config.crop_scale) == (0.08, 1.0)
  assert config.verify_images and not config.strict and config.flip
  assert {e.lower() for e in config.extensions} == {"jpg", "jpeg", "png", "bmp"}
  assert config.ignore_index == 255 and tuple(config.scale_range) == (0.5, 2.0)
  assert config.masks_dir == "masks"
  assert config.class_names is None and config.mask_map is None


def test_placeholders_type_check():
  config = data.default_config()
  config.resize_size = 256
  config.tfds_data_dir = "/tmp/tfds"
  config.class_names = ("background", "pet")
  config.mask_map = ((1, 1), (2, 0), (3, 255))
  with pytest.raises(TypeError):
    config.resize_size = "big"
  with pytest.raises(TypeError):
    config.class_names = "background"


def test_registered_names_and_typo_hint():
  assert {"digits", "folder", "cifar10", "cifar100", "svhn_cropped",
          "mnist", "mask_folder", "oxford_iiit_pet",
          "cityscapes"} <= set(data.DATASETS.names())
  config = data.default_config()
  config.name = "cifar1O"
  with pytest.raises(KeyError, match="cifar10"):
    data.build(config, batch_size=8)


def test_bad_option_names_fail_clearly(digits_config):
  digits_config.train_crop = "random_crop"
  with pytest.raises(ValueError, match="random_resized_crop"):
    data.build(digits_config, batch_size=8)
