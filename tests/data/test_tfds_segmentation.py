"""oxford_iiit_pet and cityscapes through the real TFDS builders, mocked.

What `tfds.testing.mock_data` really gives for these builders: random
images and masks of independent sizes (oxford_iiit_pet: 5-50 px each side;
cityscapes: 1024 x 2048, about 2 s per example to make) holding any value
0-254, so a real example never comes out of it. The default mock is used to
check that such data fails clearly; the plumbing and the label mapping are
checked with small examples of our own (`as_dataset_fn`), still read through
`tfds.load` with the builder's own info and splits.
"""
import itertools
from unittest import mock

import numpy as np
from PIL import Image
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from tests.conftest import shared_data
from tlflax import data
from tlflax.data import preprocess_masks, segmentation

KEYS = {"oxford_iiit_pet": ("image", "segmentation_mask", "file_name"),
        "cityscapes": ("image_left", "segmentation_label", "image_id")}


def _config(name, **overrides):
  config = data.default_config()
  config.name = name
  config.image_size = 16
  config.update(overrides)
  return config


def _raw_masks(values, num, seed=0, size=(12, 20)):
  """num masks of 4 x 4 blocks drawn from `values`, each [H, W] uint8."""
  rng = np.random.default_rng(seed)
  blocks = rng.choice(np.array(values, np.uint8), (num, size[0] // 4,
                                                   size[1] // 4))
  return np.kron(blocks, np.ones((1, 4, 4), np.uint8))


def _as_dataset_fn(name, masks):
  """Encoded examples with the given masks, as the builder's decoders give."""
  image_key, mask_key, id_key = KEYS[name]
  images = [tf.io.encode_jpeg(np.full(m.shape + (3,), 100, np.uint8)).numpy()
            for m in masks]
  encoded = [tf.io.encode_png(m[..., None]).numpy() for m in masks]
  ids = [f"example_{i}".encode() for i in range(len(masks))]

  def as_dataset(self, split, decoders=None, **kwargs):
    del self, split, decoders, kwargs
    return tf.data.Dataset.from_tensor_slices(
        {image_key: images, mask_key: encoded, id_key: ids})

  return as_dataset


def _expected_eval_labels(masks, mapping, size):
  lut = segmentation.mask_mapping(*mapping, ignore_index=255).table
  return np.stack([lut[preprocess_masks.resize_mask(m, size, size).numpy()]
                   for m in masks])


@pytest.mark.parametrize("mapping", [segmentation.PETS_TRIMAP_2CLASS,
                                     segmentation.PETS_TRIMAP_3CLASS])
def test_pets_trimaps_map_to_classes(mapping):
  masks = _raw_masks([1, 2, 3], num=10)
  with tfds.testing.mock_data(
      as_dataset_fn=_as_dataset_fn("oxford_iiit_pet", masks)):
    config = _config("oxford_iiit_pet", class_names=mapping[0],
                     mask_map=mapping[1])
    pipe = data.build(config, batch_size=4, eval_batch_size=4)
    assert pipe.class_names == list(mapping[0]) and pipe.label_kind == "mask"
    assert (pipe.num_train, pipe.num_eval) == (10, 10)
    batches = list(pipe.eval_batches())
    labels = np.concatenate([b["label"] for b in batches])
    mask = np.concatenate([b["mask"] for b in batches])
    np.testing.assert_array_equal(mask, np.repeat([1.0, 0.0], [10, 2]))
    np.testing.assert_array_equal(labels[:10],
                                  _expected_eval_labels(masks, mapping, 16))
    assert (labels[10:] == 255).all()
    train = next(pipe.train_batches())
    assert train["label"].shape == (4, 16, 16)
    assert set(np.unique(train["label"])) <= {0, 1, 2, 255}


def test_pets_default_is_two_classes_and_stream_resume_is_exact():
  masks = _raw_masks([1, 2, 3], num=12, seed=1)
  with tfds.testing.mock_data(
      as_dataset_fn=_as_dataset_fn("oxford_iiit_pet", masks)):
    pipe = data.build(_config("oxford_iiit_pet", shuffle_buffer=5),
                      batch_size=4, eval_batch_size=4, seed=2)
    assert pipe.class_names == ["background", "pet"]
    fresh = list(itertools.islice(pipe.train_batches(), 5))  # 3 per epoch.
    for k in (1, 4):
      resumed = next(pipe.train_batches(start_step=k))
      for key in ("image", "label"):
        np.testing.assert_array_equal(resumed[key], fresh[k][key])


def test_cityscapes_label_ids_become_train_ids():
  ids = [0, 7, 8, 11, 24, 26, 33, 4]  # 0 and 4 are ignored ids.
  masks = _raw_masks(ids, num=3, size=(16, 16))
  with tfds.testing.mock_data(
      as_dataset_fn=_as_dataset_fn("cityscapes", masks)):
    pipe = data.build(_config("cityscapes"), batch_size=2, eval_batch_size=3)
    assert len(pipe.class_names) == 19 and pipe.class_names[13] == "car"
    (batch,) = list(pipe.eval_batches())
  train_ids = {0: 255, 7: 0, 8: 1, 11: 2, 24: 11, 26: 13, 33: 18, 4: 255}
  expected = np.vectorize(train_ids.get)(masks)  # 16 px: no resize at eval.
  np.testing.assert_array_equal(batch["label"], expected)


def test_raw_values_the_mapping_does_not_know_fail_naming_the_example():
  masks = _raw_masks([7, 40], num=2, size=(8, 8))  # 40 is no Cityscapes id.
  with tfds.testing.mock_data(
      as_dataset_fn=_as_dataset_fn("cityscapes", masks)):
    pipe = data.build(_config("cityscapes"), batch_size=2)
    with pytest.raises(tf.errors.InvalidArgumentError) as error:
      next(pipe.eval_batches())
  message = str(error.value)
  assert "does not map" in message and "example_0" in message


def test_default_mock_sizes_differ_and_the_error_says_so():
  with tfds.testing.mock_data(num_examples=4):
    pipe = data.build(_config("oxford_iiit_pet"), batch_size=2)
    assert (pipe.num_train, pipe.num_eval) == (4, 4)
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match="mask size differs from image size"):
      next(pipe.train_batches())


def test_manual_dir_reaches_the_download_config(tmp_path):
  config = _config("cityscapes", tfds_manual_dir=str(tmp_path))
  kwargs = segmentation.download_kwargs(config)
  assert str(kwargs["download_config"].manual_dir) == str(tmp_path)
  assert segmentation.download_kwargs(_config("cityscapes")) == {}


def _fake_pets_download(tmp_path, pets, splits):
  """The layout oxford_iiit_pet's builder extracts, linking real subset files.

  {split file: [names]}; lines are "<name> <breed id> <species id> 1".
  """
  breeds = {"Abyssinian": "1 1", "Bengal": "6 1", "american_bulldog": "2 2"}
  images = tmp_path / "images" / "images"
  annotations = tmp_path / "annotations" / "annotations"
  for folder in (images, annotations / "trimaps", annotations / "xmls"):
    folder.mkdir(parents=True)
  for split_file, names in splits.items():
    for name in names:
      (images / f"{name}.jpg").symlink_to(pets / "images" / f"{name}.jpg")
      for kind, ext in (("trimaps", "png"), ("xmls", "xml")):
        (annotations / kind / f"{name}.{ext}").symlink_to(
            pets / kind / f"{name}.{ext}")
    lines = [f"{n} {breeds[n.rsplit('_', 1)[0]]} 1" for n in names]
    (annotations / split_file).write_text("\n".join(lines) + "\n")
  return {"images": str(tmp_path / "images"),
          "annotations": str(tmp_path / "annotations")}


def test_real_builder_on_real_pet_files(tmp_path):
  """oxford_iiit_pet prepared by its own builder from real subset files."""
  pets = shared_data("oxford_pets_subset")
  paths = _fake_pets_download(tmp_path / "download", pets, {
      "trainval.txt": ["Abyssinian_1", "american_bulldog_10"],
      "test.txt": ["Bengal_171"]})
  with mock.patch.object(tfds.download.DownloadManager,
                         "download_and_extract", lambda self, urls: paths):
    tfds.builder("oxford_iiit_pet",
                 data_dir=str(tmp_path / "tfds")).download_and_prepare()
  config = _config("oxford_iiit_pet", tfds_data_dir=str(tmp_path / "tfds"))
  pipe = data.build(config, batch_size=2, eval_batch_size=2)
  assert (pipe.num_train, pipe.num_eval) == (2, 1)
  records = pipe.source.eval_records
  (row,) = list(records.stream)
  assert row["id"].numpy() == b"Bengal_171.jpg"
  label = records.decode(row)["label"].numpy()
  raw = np.asarray(Image.open(pets / "trimaps" / "Bengal_171.png"))
  np.testing.assert_array_equal(label, np.select(
      [raw == 1, raw == 2, raw == 3], [1, 0, 255], -1))
  (batch,) = list(pipe.eval_batches())
  assert batch["label"].shape == (2, 16, 16)
  assert set(np.unique(batch["label"][0])) == {0, 1, 255}
