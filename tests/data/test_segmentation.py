"""mask_folder: the pets subset end to end, the class mapping, bad input."""
import itertools
from pathlib import Path

import numpy as np
from PIL import Image
import pytest

from tests.conftest import shared_data
from tlflax import data
from tlflax.data import segmentation

PETS_2 = segmentation.PETS_TRIMAP_2CLASS
PETS_3 = segmentation.PETS_TRIMAP_3CLASS


def _config(root, mapping=PETS_2, **overrides):
  config = data.default_config()
  config.name = "mask_folder"
  config.root = str(root)
  config.image_size = 32
  config.class_names, config.mask_map = mapping
  config.update(overrides)
  return config


@pytest.fixture(scope="module")
def pets():
  return shared_data("oxford_pets_subset")


def _pets_config(pets, mapping=PETS_2, **overrides):
  return _config(pets, mapping, masks_dir="trimaps", verify_images=False,
                 **overrides)


def _stems(root: Path, split: str):
  return [s for s in (root / "splits" / f"{split}.txt").read_text().split()]


def test_pets_counts_and_batches(pets):
  pipe = data.build(_pets_config(pets), batch_size=8, eval_batch_size=16)
  assert pipe.label_kind == "mask"
  assert pipe.class_names == ["background", "pet"]
  assert (pipe.num_train, pipe.num_eval) == (len(_stems(pets, "train")),
                                             len(_stems(pets, "val")))
  assert (pipe.num_train, pipe.num_eval) == (236, 60)
  train = next(pipe.train_batches(start_step=2))
  assert train.keys() == {"image", "label"}
  assert train["image"].shape == (8, 32, 32, 3)
  assert train["image"].dtype == np.float32
  assert train["label"].shape == (8, 32, 32)
  assert train["label"].dtype == np.int32
  assert set(np.unique(train["label"])) == {0, 1, 255}
  batches = list(pipe.eval_batches())  # 60 = 3 * 16 + 12.
  assert len(batches) == 4
  assert all(b["label"].shape == (16, 32, 32) and b["mask"].shape == (16,)
             for b in batches)
  mask = np.concatenate([b["mask"] for b in batches])
  np.testing.assert_array_equal(mask, np.repeat([1.0, 0.0], [60, 4]))
  last = batches[-1]
  assert (last["label"][12:] == 255).all() and (last["image"][12:] == 0).all()
  assert all((b["label"][b["mask"] == 1] != 255).any(axis=(1, 2)).all()
             for b in batches)  # Every real row has labelled pixels.


@pytest.mark.parametrize("mapping,expected", [
    (PETS_2, {0: 2, 1: 1, 255: 3}),  # class (or ignore) <- raw trimap value.
    (PETS_3, {0: 2, 1: 1, 2: 3}),
])
def test_trimap_mapping_on_a_known_mask(pets, mapping, expected):
  stem = _stems(pets, "val")[0]
  raw = np.asarray(Image.open(pets / "trimaps" / f"{stem}.png"))
  pipe = data.build(_pets_config(pets, mapping), batch_size=8)
  records = pipe.source.eval_records
  index = [Path(p).stem for p in records.table["mask_path"]].index(stem)
  row = {k: v[index] for k, v in records.table.items()}
  example = {k: v.numpy() for k, v in records.decode(row).items()}
  label = example["label"]
  assert label.shape == raw.shape == example["image"].shape[:2]
  for cls, raw_value in expected.items():  # Class fractions as in the PNG.
    assert (label == cls).mean() == (raw == raw_value).mean() > 0
  np.testing.assert_array_equal(label, np.select(
      [raw == r for r in expected.values()], list(expected), -1))


def test_pets_resume_equals_uninterrupted_stream(pets):
  pipe = data.build(_pets_config(pets), batch_size=16, seed=3)
  fresh = list(itertools.islice(pipe.train_batches(), 4))
  for k in (1, 3):
    resumed = next(pipe.train_batches(start_step=k))
    for key in ("image", "label"):
      np.testing.assert_array_equal(resumed[key], fresh[k][key])
  assert not np.array_equal(fresh[1]["label"], fresh[3]["label"])


def test_cache_gives_the_same_batches(tmp_path):
  root = _tiny_folder(tmp_path, n=6, size=(20, 14))
  plain = data.build(_config(root), batch_size=4, eval_batch_size=4, seed=1)
  cached = data.build(_config(root, cache=True), batch_size=4,
                      eval_batch_size=4, seed=1)
  assert cached.records("train").in_memory
  for a, b in zip(itertools.islice(plain.train_batches(), 3),
                  itertools.islice(cached.train_batches(), 3)):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
  for a, b in zip(plain.eval_batches(), cached.eval_batches()):
    np.testing.assert_array_equal(a["label"], b["label"])


# ---------------------------------------------------------------------------
# Tiny fake folders for the bad-input contract.


def _save_pair(root, stem, size=(12, 8), mask=None, mask_size=None,
               image_ext="jpg"):
  width, height = size
  rng = np.random.default_rng(len(stem))
  pixels = rng.integers(0, 256, (height, width, 3)).astype(np.uint8)
  Image.fromarray(pixels).save(root / "images" / f"{stem}.{image_ext}")
  if mask is None:
    mask_w, mask_h = mask_size or size
    mask = rng.choice(np.array([1, 2, 3], np.uint8), (mask_h, mask_w))
  Image.fromarray(mask).save(root / "masks" / f"{stem}.png")


def _tiny_folder(root, n=2, size=(12, 8)):
  """n good train pairs a0.., one val pair v0, PETS trimap values."""
  for folder in ("images", "masks", "splits"):
    (root / folder).mkdir(parents=True, exist_ok=True)
  train = [f"a{i}" for i in range(n)]
  for stem in train + ["v0"]:
    _save_pair(root, stem, size)
  (root / "splits" / "train.txt").write_text("\n".join(train) + "\n")
  (root / "splits" / "val.txt").write_text("v0\n")
  return root


def _error(config) -> str:
  with pytest.raises(ValueError) as error:
    data.build(config, batch_size=1)
  return str(error.value)


def test_tiny_folder_builds(tmp_path):
  root = _tiny_folder(tmp_path, n=3)
  pipe = data.build(_config(root), batch_size=2)
  assert (pipe.num_train, pipe.num_eval) == (3, 1)
  assert next(pipe.train_batches())["label"].shape == (2, 32, 32)


def test_process_shards_add_up_to_the_single_process_batches(tmp_path):
  root = _tiny_folder(tmp_path, n=5)
  def batches(**kw):
    pipe = data.build(_config(root, eval_split="train"), batch_size=4,
                      eval_batch_size=4, seed=2, **kw)
    return [next(pipe.train_batches(start_step=3))] + list(pipe.eval_batches())
  single = batches()
  shards = [batches(process_index=p, process_count=2) for p in range(2)]
  assert len(single) == 3  # One train batch, 2 eval batches (5 + 3 padding).
  np.testing.assert_array_equal(single[-1]["mask"], [1, 0, 0, 0])
  assert (single[-1]["label"][1:] == 255).all()
  for k, whole in enumerate(single):
    for key in whole:
      np.testing.assert_array_equal(
          np.concatenate([shards[0][k][key], shards[1][k][key]]), whole[key])


def test_size_mismatch_names_the_mask_and_its_image(tmp_path):
  root = _tiny_folder(tmp_path)
  _save_pair(root, "a1", size=(12, 8), mask_size=(8, 12))
  message = _error(_config(root))
  assert str(root / "masks" / "a1.png") in message
  assert "mask is 8x12 (WxH)" in message and "is 12x8" in message
  assert "a0.png" not in message


def test_value_outside_the_mapping_is_named(tmp_path):
  root = _tiny_folder(tmp_path)
  mask = np.full((8, 12), 2, np.uint8)
  mask[0, :3] = [4, 9, 1]
  _save_pair(root, "v0", mask=mask)
  message = _error(_config(root))
  assert str(root / "masks" / "v0.png") in message
  assert "values [4, 9] are not in config.mask_map" in message
  assert "maps [1, 2, 3]" in message


def test_identity_mapping_allows_classes_and_ignore_only(tmp_path):
  root = _tiny_folder(tmp_path)
  for stem, values in (("a0", [0, 1, 255]), ("a1", [0, 1]), ("v0", [1, 5])):
    mask = np.resize(np.array(values, np.uint8), (8, 12))
    _save_pair(root, stem, mask=mask)
  config = _config(root, (("background", "pet"), None))
  message = _error(config)
  assert "v0.png" in message and "a0.png" not in message
  assert "values [5] are neither class indices 0..1" in message
  (root / "splits" / "val.txt").write_text("a1\n")
  pipe = data.build(config, batch_size=1)
  labels = pipe.source.train.as_numpy_iterator()
  assert set(np.unique(next(labels)["label"])) == {0, 1, 255}


def test_missing_files_and_unreadable_image_all_listed(tmp_path):
  root = _tiny_folder(tmp_path, n=3)
  (root / "masks" / "a0.png").unlink()
  (root / "images" / "a1.jpg").unlink()
  (root / "images" / "a2.jpg").write_bytes(b"not a jpeg at all")
  message = _error(_config(root))
  assert f"{root / 'masks' / 'a0.png'}: missing mask" in message
  assert f"{root / 'images' / 'a1'}.<ext>: missing image" in message
  assert f"{root / 'images' / 'a2.jpg'}: not an image" in message
  assert "3 problem(s)" in message


def test_long_lists_are_capped(tmp_path):
  root = _tiny_folder(tmp_path, n=25)
  for stem in [f"a{i}" for i in range(25)]:
    (root / "masks" / f"{stem}.png").unlink()
  message = _error(_config(root))
  assert "25 problem(s)" in message and "... and 5 more." in message
  assert message.count("missing mask") == segmentation.MAX_LISTED


def test_colour_mask_is_rejected_palette_mask_is_read_as_indices(tmp_path):
  root = _tiny_folder(tmp_path)
  Image.new("RGB", (12, 8), (1, 2, 3)).save(root / "masks" / "a0.png")
  message = _error(_config(root))
  assert "a0.png: mask mode RGB" in message
  # A palette PNG (the VOC format): the indices are the values, whatever
  # colours the palette gives them.
  palette = Image.fromarray(np.resize(np.array([1, 2, 3], np.uint8), (8, 12)),
                            "P")
  palette.putpalette([0, 0, 0, 200, 0, 0, 0, 200, 0, 0, 0, 200] + [0] * 756)
  palette.save(root / "masks" / "a0.png")
  pipe = data.build(_config(root), batch_size=1)
  first = next(pipe.source.train.as_numpy_iterator())["label"]
  expected = np.resize(np.array([1, 0, 255], np.uint8), (8, 12))
  np.testing.assert_array_equal(first, expected)


def test_layout_and_config_errors(tmp_path):
  root = _tiny_folder(tmp_path)
  with pytest.raises(FileNotFoundError, match="test.txt"):
    data.build(_config(root, eval_split="test"), batch_size=1)
  with pytest.raises(ValueError, match="class_names is not set"):
    data.build(_config(root, (None, None)), batch_size=1)
  with pytest.raises(ValueError, match=r"targets \[2\] are neither"):
    data.build(_config(root, (("a", "b"), ((1, 1), (2, 2)))), batch_size=1)
  with pytest.raises(ValueError, match=r"raw values listed twice: \[1\]"):
    data.build(_config(root, (("a", "b"), ((1, 1), (1, 0)))), batch_size=1)
  with pytest.raises(ValueError, match="ignore_index=1 is a class index"):
    data.build(_config(root, ignore_index=1), batch_size=1)


def test_mapping_table_and_dtype():
  mapping = segmentation.mask_mapping(*PETS_2, ignore_index=255)
  assert mapping.table.dtype == np.uint8
  np.testing.assert_array_equal(mapping.table[:4], [255, 1, 0, 255])
  assert mapping.unknown(np.array([0, 1, 2, 3, 300])) == [0, 300]
  wide = segmentation.mask_mapping(("a", "b"), ((1000, 1), (0, 0)), -1)
  assert wide.table.dtype == np.int32 and len(wide.table) == 1001
  assert wide.table[1000] == 1 and wide.table[5] == -1


def test_cityscapes_constant_maps_ids_to_the_19_train_ids():
  names, pairs = segmentation.CITYSCAPES_19
  table = dict(pairs)
  assert len(names) == 19 and sorted(table) == list(range(34))
  assert [table[i] for i in (7, 8, 11, 26, 33)] == [0, 1, 2, 13, 18]
  assert names[table[24]] == "person" and names[table[21]] == "vegetation"
  assert sorted(v for v in table.values() if v != 255) == list(range(19))
  assert sum(v == 255 for v in table.values()) == 34 - 19
