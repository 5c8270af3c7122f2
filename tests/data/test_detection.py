"""voc_folder and coco_json: the pets head boxes end to end, bad annotations.

The pets XMLs hold 1-based pixel corners; a box (xmin, ymin, xmax, ymax)
must come out as (xmin - 1, ymin - 1, xmax, ymax) in original pixels, and
as that times "scale" in the batches.
"""
import itertools
import json
import logging
from pathlib import Path
import xml.etree.ElementTree as ET

import numpy as np
from PIL import Image
import pytest

from tests.conftest import shared_data
from tlflax import data
from tlflax.data import detection

SIZE = 64


@pytest.fixture(scope="module")
def pets():
  return shared_data("oxford_pets_subset")


def _config(root, name="voc_folder", **overrides):
  config = data.default_config()
  config.name = name
  config.root = str(root)
  config.image_size = SIZE
  config.max_boxes = 4
  config.update(overrides)
  return config


def _xml_boxes(path: Path):
  """[(name, 0-based xyxy)] read by hand from a VOC XML."""
  root = ET.parse(path).getroot()
  out = []
  for obj in root.iter("object"):
    box = [float(obj.find(f"bndbox/{k}").text)
           for k in ("xmin", "ymin", "xmax", "ymax")]
    out.append((obj.find("name").text, [box[0] - 1, box[1] - 1, box[2],
                                        box[3]]))
  return out


def _stems(root, split):
  return (root / "splits" / f"{split}.txt").read_text().split()


def _example(source, split, stem):
  records = source.records(split)
  paths = [Path(p).stem for p in records.table["image_path"]]
  row = {k: v[paths.index(stem)] for k, v in records.table.items()}
  return {k: v.numpy() for k, v in records.decode(row).items()}


# ---------------------------------------------------------------------------
# The real pets subset.


def test_pets_counts_classes_and_a_known_box(pets):
  source = data.build_source(_config(pets, verify_images=False))
  assert source.label_kind == "boxes" and source.class_names == ["cat", "dog"]
  assert (source.num_train, source.num_eval) == (236, 60) and not source.skipped
  # Abyssinian_100.xml: <size> 394x500, cat, xmin 151 ymin 71 xmax 335 ymax 267.
  example = _example(source, "train", "Abyssinian_100")
  np.testing.assert_array_equal(example["boxes"], [[150, 70, 335, 267]])
  np.testing.assert_array_equal(example["classes"], [0])
  assert example["image"].shape == (500, 394, 3) and not example["crowd"][0]
  assert example["area"][0] == 185 * 197
  two = _example(source, "train", "Bengal_105")  # The file with 2 objects.
  np.testing.assert_array_equal(two["boxes"], [[48, 124, 111, 168],
                                               [396, 102, 451, 132]])
  dog = _example(source, "eval", _stems(pets, "val")[-1])
  assert _stems(pets, "val")[-1].startswith("american_bulldog")
  np.testing.assert_array_equal(dog["classes"], [1])
  assert source.train_records.table["box_count"].sum() == 237  # 158 + 79.
  assert source.eval_records.table["box_count"].sum() == 60


def test_pets_eval_batches_map_back_to_the_xml(pets):
  pipe = data.build(_config(pets, verify_images=False), batch_size=8,
                    eval_batch_size=16)
  batches = list(pipe.eval_batches())  # 60 = 3 * 16 + 12.
  assert len(batches) == 4
  last = batches[-1]
  assert last["image"].shape == (16, SIZE, SIZE, 3)
  assert last["boxes"].shape == (16, 4, 4) and last["classes"].shape == (16, 4)
  np.testing.assert_array_equal(last["mask"], np.repeat([1.0, 0.0], [12, 4]))
  np.testing.assert_array_equal(last["image_id"][12:], -1)
  assert (last["classes"][12:] == -1).all() and (last["boxes"][12:] == 0).all()
  assert (last["scale"][12:] == 0).all() and (last["orig_size"][12:] == 0).all()
  assert (last["image"][12:] == 0).all()
  stems = _stems(pets, "val")
  image_ids = np.concatenate([b["image_id"] for b in batches])
  np.testing.assert_array_equal(image_ids[:60], np.arange(60))
  for batch in batches:
    for row in np.flatnonzero(batch["mask"]):
      stem = stems[batch["image_id"][row]]
      width, height = Image.open(pets / "images" / f"{stem}.jpg").size
      np.testing.assert_array_equal(batch["orig_size"][row], [height, width])
      assert batch["scale"][row] == pytest.approx(SIZE / max(height, width))
      expected = _xml_boxes(pets / "xmls" / f"{stem}.xml")
      valid = batch["classes"][row] >= 0
      assert valid.sum() == len(expected)
      np.testing.assert_allclose(
          batch["boxes"][row][valid] / batch["scale"][row],
          [box for _, box in expected], rtol=1e-5, atol=1e-3)
      assert [pipe.class_names[c] for c in batch["classes"][row][valid]] == [
          name for name, _ in expected]


def test_pets_train_batches_and_exact_resume(pets):
  pipe = data.build(_config(pets, verify_images=False), batch_size=8, seed=3)
  assert pipe.steps_per_epoch == 29
  fresh = list(itertools.islice(pipe.train_batches(), 3))
  batch = fresh[0]
  assert batch.keys() == {"image", "boxes", "classes"}
  assert batch["image"].shape == (8, SIZE, SIZE, 3)
  assert batch["image"].dtype == np.float32
  assert batch["boxes"].shape == (8, 4, 4)
  assert batch["boxes"].dtype == np.float32
  assert batch["classes"].dtype == np.int32
  assert set(np.unique(batch["classes"])) <= {-1, 0, 1}
  valid = batch["classes"] >= 0
  boxes = batch["boxes"][valid]
  assert valid.sum() >= 6 and (valid.sum(1) <= 2).all()  # Pets: 1-2 heads.
  assert (boxes[:, 2:] > boxes[:, :2]).all() and boxes.min() >= 0
  assert boxes.max() <= SIZE and (batch["boxes"][~valid] == 0).all()
  for k in (1, 2):
    resumed = next(pipe.train_batches(start_step=k))
    for key in resumed:
      np.testing.assert_array_equal(resumed[key], fresh[k][key])
  assert not np.array_equal(fresh[1]["boxes"], fresh[2]["boxes"])


def test_pets_ground_truth_and_perfect_detections_score_ap_one(pets):
  """coco_ground_truth + eval batches + tasks.coco_eval agree end to end."""
  from tlflax.tasks import coco_eval  # pylint: disable=g-import-not-at-top
  pytest.importorskip("pycocotools")
  pipe = data.build(_config(pets, verify_images=False), batch_size=8,
                    eval_batch_size=32)
  gt = data.coco_ground_truth(pipe)
  assert len(gt["images"]) == 60 and len(gt["annotations"]) == 60
  categories = [a["category_id"] for a in gt["annotations"]]
  assert (categories.count(1), categories.count(2)) == (40, 20)  # cat, dog.
  assert gt["categories"] == [{"id": coco_eval.category_id(0), "name": "cat"},
                              {"id": coco_eval.category_id(1), "name": "dog"}]
  first = gt["annotations"][0]  # Abyssinian_175: 63 16 173 126, 600x234.
  assert first == {"id": 1, "image_id": 0, "category_id": 1,
                   "bbox": [62.0, 15.0, 111.0, 111.0], "area": 12321.0,
                   "iscrowd": 0}
  assert gt["images"][0] == {"id": 0, "width": 600, "height": 234}
  detections = []
  for batch in pipe.eval_batches():
    valid = (batch["classes"] >= 0) & (batch["mask"][:, None] > 0)
    detections += coco_eval.to_coco_detections(
        batch["boxes"], np.ones(batch["classes"].shape), batch["classes"],
        valid, batch["image_id"], np.where(batch["mask"] > 0, batch["scale"],
                                           1.0))
  scalars = coco_eval.coco_metrics(gt, detections, pipe.class_names)["scalars"]
  assert scalars["eval/AP"] == pytest.approx(1.0)
  assert scalars["eval/AP/dog"] == pytest.approx(1.0)


def test_cache_gives_the_same_batches(pets):
  config = _config(pets, verify_images=False, train_split="val")
  plain = data.build(config, batch_size=8, eval_batch_size=8, seed=1)
  config.cache = True
  cached = data.build(config, batch_size=8, eval_batch_size=8, seed=1)
  assert cached.records("train").in_memory
  for a, b in zip(itertools.islice(plain.train_batches(start_step=6), 2),
                  itertools.islice(cached.train_batches(start_step=6), 2)):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
  assert data.coco_ground_truth(plain) == data.coco_ground_truth(cached)


# ---------------------------------------------------------------------------
# Small VOC folders with bad annotations.


def _voc_xml(objects, size=(40, 30), name="x"):
  parts = [f"<annotation><filename>{name}.jpg</filename>"]
  if size:
    parts.append(f"<size><width>{size[0]}</width><height>{size[1]}</height>"
                 "<depth>3</depth></size>")
  for obj_name, (x1, y1, x2, y2), *difficult in objects:
    parts.append(f"<object><name>{obj_name}</name><bndbox><xmin>{x1}</xmin>"
                 f"<ymin>{y1}</ymin><xmax>{x2}</xmax><ymax>{y2}</ymax>"
                 f"</bndbox><difficult>{int(bool(difficult))}</difficult>"
                 "</object>")
  return "".join(parts) + "</annotation>"


def _voc_folder(root: Path, files, splits):
  """files: {stem: (xml text, image size WxH)}; splits: {split: [stems]}."""
  for folder in ("images", "xmls", "splits"):
    (root / folder).mkdir(parents=True, exist_ok=True)
  for stem, (xml, size) in files.items():
    Image.new("RGB", size, (90, 120, 150)).save(root / "images" / f"{stem}.png")
    (root / "xmls" / f"{stem}.xml").write_text(xml)
  for split, stems in splits.items():
    (root / "splits" / f"{split}.txt").write_text("\n".join(stems) + "\n")
  return root


GOOD = {"a": (_voc_xml([("cat", (1, 1, 20, 10)), ("dog", (5, 5, 30, 25))]),
              (40, 30)),
        "b": (_voc_xml([("dog", (2, 3, 12, 13), 1)]), (40, 30))}


def test_voc_repairs_clip_and_drop_naming_files(tmp_path, caplog):
  files = dict(GOOD)
  files["bad"] = (_voc_xml([("cat", (-5, 2, 50, 20)),  # Out of bounds.
                            ("cat", (10, 10, 10, 20)),  # One pixel wide.
                            ("cat", (10, 10, 9, 20)),  # Zero width.
                            ("dog", (30, 5, 20, 25)),  # Inverted.
                            ("dog", (50, 40, 60, 45))]),  # Wholly outside.
                  (40, 30))
  root = _voc_folder(tmp_path, files, {"train": ["a", "bad"], "val": ["b"]})
  with caplog.at_level(logging.WARNING):
    source = data.build_source(_config(root, verify_images=False))
  assert source.class_names == ["cat", "dog"]
  example = _example(source, "train", "bad")
  np.testing.assert_array_equal(example["boxes"], [[0, 1, 40, 20],
                                                   [9, 9, 10, 20]])
  reasons = [(Path(p).name, r) for p, r in source.skipped]
  assert [n for n, _ in reasons] == ["bad.xml"] * 4
  assert sum(r.startswith("box clipped") for _, r in reasons) == 1
  assert sum(r.startswith("box dropped") for _, r in reasons) == 3
  assert "(-6, 1, 50, 20)" in reasons[-1][1]  # The box as read (0-based),
  assert "(0, 1, 40, 20)" in reasons[-1][1]  # and as clipped.
  assert "bad.xml" in caplog.text and "zero or negative" in caplog.text
  with pytest.raises(ValueError, match="bad.xml"):
    data.build_source(_config(root, verify_images=False, strict=True))


def test_voc_difficult_is_crowd_left_out_of_batches(tmp_path):
  root = _voc_folder(tmp_path, GOOD, {"train": ["a", "b"], "val": ["b", "a"]})
  pipe = data.build(_config(root), batch_size=2, eval_batch_size=2)
  b = _example(pipe.source, "eval", "b")
  assert b["crowd"].tolist() == [True]
  (batch,) = list(pipe.eval_batches())
  assert (batch["classes"][0] == -1).all()  # b: its only box is difficult.
  np.testing.assert_array_equal(batch["classes"][1], [0, 1, -1, -1])
  gt = data.coco_ground_truth(pipe)
  assert [(a["image_id"], a["iscrowd"]) for a in gt["annotations"]] == [
      (0, 1), (1, 0), (1, 0)]
  assert gt["annotations"][0]["bbox"] == [1.0, 2.0, 11.0, 11.0]
  train = next(pipe.train_batches())
  assert (train["classes"] >= 0).sum() <= 2  # Only a's two boxes can appear.


def test_voc_unknown_class_names_the_file_and_name(tmp_path):
  files = dict(GOOD, c=(_voc_xml([("horse", (1, 1, 9, 9))]), (40, 30)))
  root = _voc_folder(tmp_path, files, {"train": ["a", "c"], "val": ["b"]})
  with pytest.raises(ValueError) as error:
    data.build_source(_config(root, class_names=("cat", "dog")))
  message = str(error.value)
  assert "c.xml" in message and "'horse'" in message
  assert "class_map" in message
  mapped = data.build_source(_config(root, class_names=("cat", "dog"),
                                     class_map=(("horse", "dog"),)))
  np.testing.assert_array_equal(_example(mapped, "train", "c")["classes"], [1])
  merged = data.build_source(_config(root, class_map=(("cat", "pet"),
                                                      ("dog", "pet"))))
  assert merged.class_names == ["horse", "pet"]


def test_voc_size_mismatch_and_broken_xml_are_skipped(tmp_path):
  files = dict(GOOD)
  files["rotated"] = (_voc_xml([("cat", (1, 1, 9, 9))], size=(30, 40)),
                      (40, 30))
  files["nosize"] = (_voc_xml([("cat", (1, 1, 9, 9))], size=None), (40, 30))
  files["broken"] = ("<annotation><object><name>cat</name>", (40, 30))
  files["nobox"] = ("<annotation><object><name>cat</name></object>"
                    "</annotation>", (40, 30))
  root = _voc_folder(tmp_path, files, {
      "train": ["a", "rotated", "nosize", "broken", "nobox", "missing"],
      "val": ["b"]})
  source = data.build_source(_config(root))
  assert source.num_train == 2  # a and nosize (size from the image).
  skipped = {Path(p).name: r for p, r in source.skipped}
  assert "30x40" in skipped["rotated.xml"] and "40x30" in skipped["rotated.xml"]
  assert "not a readable XML" in skipped["broken.xml"]
  assert "xmin" in skipped["nobox.xml"]
  assert "missing" in skipped["missing.<ext>"]
  with pytest.raises(ValueError) as error:
    data.build_source(_config(root, strict=True))
  for name in ("rotated.xml", "broken.xml", "nobox.xml"):
    assert name in str(error.value)


def test_voc_layout_errors(tmp_path):
  root = _voc_folder(tmp_path, GOOD, {"train": ["a"]})
  with pytest.raises(FileNotFoundError, match="val.txt"):
    data.build_source(_config(root))
  with pytest.raises(FileNotFoundError, match="annotations_dir"):
    data.build_source(_config(root, annotations_dir="Annotations"))


# ---------------------------------------------------------------------------
# coco_json.


def _coco(tmp_path, images, annotations, categories, split="train"):
  """Writes images (file_name -> WxH) and <root>/annotations/<split>.json."""
  (tmp_path / "images").mkdir(exist_ok=True)
  (tmp_path / "annotations").mkdir(exist_ok=True)
  entries = []
  for image_id, (file_name, size, *given) in images.items():
    Image.new("RGB", size, (30, 60, 90)).save(tmp_path / "images" / file_name)
    width, height = given[0] if given else size
    entries.append({"id": image_id, "file_name": file_name, "width": width,
                    "height": height})
  content = {"images": entries, "categories": categories,
             "annotations": [dict(id=k + 1, **a)
                             for k, a in enumerate(annotations)]}
  path = tmp_path / "annotations" / f"{split}.json"
  path.write_text(json.dumps(content))
  return path


CATEGORIES = [{"id": 7, "name": "zebra"}, {"id": 3, "name": "cow"}]


def _coco_config(root, **overrides):
  return _config(root, "coco_json", annotations="annotations/{split}.json",
                 **overrides)


def test_coco_json_boxes_categories_and_crowd(tmp_path):
  _coco(tmp_path, {5: ("p.png", (40, 30)), 2: ("q.png", (20, 50))}, [
      {"image_id": 5, "category_id": 7, "bbox": [2.5, 3, 10, 20],
       "area": 150.0, "iscrowd": 0},
      {"image_id": 5, "category_id": 3, "bbox": [30, 0, 15, 10],
       "iscrowd": 0},  # x2 = 45 > 40: clipped.
      {"image_id": 2, "category_id": 3, "bbox": [1, 1, 0, 5], "iscrowd": 0},
      {"image_id": 2, "category_id": 7, "bbox": [0, 0, 20, 50], "iscrowd": 1},
  ], CATEGORIES)
  _coco(tmp_path, {1: ("p.png", (40, 30))}, [
      {"image_id": 1, "category_id": 3, "bbox": [4, 4, 8, 8], "iscrowd": 0}],
        CATEGORIES, split="val")
  pipe = data.build(_coco_config(tmp_path), batch_size=2, eval_batch_size=2)
  assert pipe.class_names == ["cow", "zebra"]  # Sorted by category id: 3, 7.
  assert (pipe.num_train, pipe.num_eval) == (2, 1)
  q, p = (_example(pipe.source, "train", s) for s in ("q", "p"))  # By id.
  assert q["image_id"] == 0 and p["image_id"] == 1
  np.testing.assert_allclose(p["boxes"], [[2.5, 3, 12.5, 23], [30, 0, 40, 10]])
  np.testing.assert_array_equal(p["classes"], [1, 0])
  np.testing.assert_allclose(p["area"], [150.0, 150.0])  # Given, else w * h.
  np.testing.assert_array_equal(q["crowd"], [True])  # Zero width dropped.
  reasons = [r for _, r in pipe.skipped]
  assert any("annotation 2" in r and "clipped" in r for r in reasons)
  assert any("annotation 3" in r and "dropped" in r for r in reasons)
  assert all("train.json" in p for p, _ in pipe.skipped)
  batch = next(pipe.train_batches())
  assert sorted(batch["classes"][batch["classes"] >= 0].tolist()) == [0, 1]
  gt = data.coco_ground_truth(pipe)
  assert gt["annotations"] == [{"id": 1, "image_id": 0, "category_id": 1,
                                "bbox": [4.0, 4.0, 8.0, 8.0], "area": 64.0,
                                "iscrowd": 0}]


def test_coco_json_unknown_category_and_size_mismatch(tmp_path):
  _coco(tmp_path, {1: ("p.png", (40, 30))}, [
      {"image_id": 1, "category_id": 9, "bbox": [1, 1, 5, 5], "iscrowd": 0}],
        CATEGORIES)
  _coco(tmp_path, {1: ("p.png", (40, 30)), 2: ("r.png", (40, 30), (30, 40))},
        [], CATEGORIES, split="val")
  with pytest.raises(ValueError) as error:
    data.build_source(_coco_config(tmp_path))
  assert "train.json" in str(error.value) and "category_id 9" in str(
      error.value)
  _coco(tmp_path, {1: ("p.png", (40, 30))}, [], CATEGORIES)
  source = data.build_source(_coco_config(tmp_path))
  assert source.num_eval == 1
  ((path, reason),) = source.skipped
  assert path.endswith("r.png") and "30x40" in reason and "val.json" in reason
  with pytest.raises(ValueError, match="r.png"):
    data.build_source(_coco_config(tmp_path, strict=True))
  (tmp_path / "annotations" / "val.json").write_text("{not json")
  with pytest.raises(ValueError, match="val.json"):
    data.build_source(_coco_config(tmp_path))


def test_config_fields_and_registered_names():
  config = data.default_config()
  assert config.max_boxes == 100 and config.min_box_size == 1.0
  assert tuple(config.box_scale_range) == (0.75, 1.25)
  assert (config.images_dir, config.annotations_dir) == ("images", "xmls")
  assert "{split}" in config.annotations and config.class_map is None
  assert {"voc_folder", "coco_json", "voc/2007", "voc/2012",
          "coco/2017"} <= set(data.DATASETS.names())
  with pytest.raises(ValueError, match="label_kind 'boxes'"):
    data.coco_ground_truth(data.build(_digits(), batch_size=8))
  assert detection.category_id(0) == 1


def _digits():
  config = data.default_config()
  config.image_size = 8
  config.train_crop, config.eval_crop = "resize", "resize"
  return config
