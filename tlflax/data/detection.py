"""Detection datasets: images with boxes and classes (label_kind "boxes").

- `voc_folder`: Pascal VOC XML, <root>/<images_dir>/<stem>.<ext> with
  <root>/<annotations_dir>/<stem>.xml, the split's stems listed in
  <root>/splits/<split>.txt. Class names: `config.class_names`, else the
  sorted object names of both splits, after `config.class_map` renames.
- `coco_json`: a COCO instances JSON per split (<root>/<annotations>, images
  under <root>/<images_dir>; "{split}" in either becomes the split name).
  Categories sorted by id become classes 0..C-1, named by the categories.
- `voc/2007`, `voc/2012`, `coco/2017`: the TFDS builders.

Boxes are (x1, y1, x2, y2) in original pixels, continuous and 0-based (pixel
(i, j) covers [j, j+1) x [i, i+1)), as torchvision has them: VOC's 1-based
pixel corners (xmin, ymin, xmax, ymax) become (xmin - 1, ymin - 1, xmax,
ymax); COCO's [x, y, w, h] becomes (x, y, x + w, y + h).

The folder datasets check every annotation when they are built:
- a box reaching outside its image is clipped to it;
- a box with zero or negative width or height (after clipping) is dropped;
- an object name that is not a class (`voc_folder` with class_names set) or
  a category id not in the categories (`coco_json`) raises a ValueError
  naming the file and the name;
- an image that cannot be used (missing or unreadable image, XML that does
  not parse, XML <size> or JSON width/height differing from the image) is
  skipped. A COCO JSON file that does not parse raises.
Every clip, drop and skip is in `SplitSource.skipped` as (file, what was
done and why) and logged; with `config.strict` drops and skips raise
instead (clips stay repairs).

VOC `difficult` and COCO `iscrowd` objects are kept with crowd=True: the
transforms leave them out of the batches (no training target), and
`coco_ground_truth` gives them iscrowd=1, so COCOeval ignores detections on
them. (COCOeval matches crowd regions by intersection over the detection's
area; VOC's own metric ignores difficult objects at plain IoU >= 0.5, so AP
near difficult objects can differ slightly from VOC's.)
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple
import xml.etree.ElementTree as ET

from absl import logging
import ml_collections
import numpy as np
import tensorflow as tf

from tlflax.data.folder import normalise_extensions, resolve_root
from tlflax.data.preprocess import decode_image
from tlflax.data.registry import register_dataset
from tlflax.data.segmentation import image_size, index_files, read_split
from tlflax.data.source import Records, SplitSource
from tlflax.data.tfds_datasets import count

MAX_LISTED = 20  # Problems named in one error or log; the rest are counted.
VOC_LAYOUT = ("The voc_folder dataset expects <root>/<images_dir>/<stem>.<ext>"
              ", Pascal VOC XML <root>/<annotations_dir>/<stem>.xml and "
              "<root>/splits/<split>.txt listing one stem per line.")
COCO_LAYOUT = ("The coco_json dataset expects a COCO instances JSON per split "
               "at <root>/<annotations> ({\"images\": [{\"id\", \"file_name\""
               ", \"width\", \"height\"}], \"annotations\": [{\"id\", "
               "\"image_id\", \"category_id\", \"bbox\": [x, y, w, h], "
               "\"iscrowd\"}], \"categories\": [{\"id\", \"name\"}]}) and the "
               "images at <root>/<images_dir>/<file_name>; \"{split}\" in "
               "annotations and images_dir is replaced by the split name.")


# ----------------------------------------------------------------------------
# One image's annotation, and what was repaired or left out.


@dataclasses.dataclass
class ImageBoxes:
  """One image's objects in original pixels (see the module docstring)."""
  image_path: str
  boxes: np.ndarray  # float32 [K, 4] xyxy.
  classes: np.ndarray  # int32 [K].
  crowd: np.ndarray  # bool [K].
  area: np.ndarray  # float32 [K]: COCO's area if given, else the box area.


@dataclasses.dataclass
class Report:
  """Images skipped, boxes dropped and boxes clipped, as (file, why)."""
  skipped: List[Tuple[str, str]] = dataclasses.field(default_factory=list)
  dropped: List[Tuple[str, str]] = dataclasses.field(default_factory=list)
  clipped: List[Tuple[str, str]] = dataclasses.field(default_factory=list)

  def entries(self) -> List[Tuple[str, str]]:
    return ([(p, f"skipped: {r}") for p, r in self.skipped]
            + [(p, f"box dropped: {r}") for p, r in self.dropped]
            + [(p, f"box clipped: {r}") for p, r in self.clipped])

  def finish(self, name: str, strict: bool) -> List[Tuple[str, str]]:
    """Logs (or, with strict, raises on skips and drops); the entries."""
    if strict and (self.skipped or self.dropped):
      raise ValueError(
          f"{name}: config.strict=True and {len(self.skipped)} image(s) "
          f"would be skipped, {len(self.dropped)} box(es) dropped:\n"
          + _lines(self.entries()[:len(self.skipped) + len(self.dropped)])
          + "\nFix those files, or set config.strict=False to skip them.")
    for kind, items in (("skipped image", self.skipped),
                        ("dropped box", self.dropped),
                        ("clipped box", self.clipped)):
      for path, reason in items[:MAX_LISTED]:
        logging.warning("%s: %s %s: %s", name, kind, path, reason)
      if items:
        logging.warning("%s: %d %s(s) in all.", name, len(items), kind)
    return self.entries()


def _lines(problems: Sequence[Tuple[str, str]]) -> str:
  lines = [f"  {path}: {reason}" for path, reason in problems[:MAX_LISTED]]
  if len(problems) > MAX_LISTED:
    lines.append(f"  ... and {len(problems) - MAX_LISTED} more.")
  return "\n".join(lines)


def _box_text(box) -> str:
  return "(" + ", ".join(f"{v:g}" for v in box) + ")"


def clean_boxes(boxes: np.ndarray, width: int, height: int,
                labels: Sequence[str], where: str, report: Report):
  """Clips [K, 4] xyxy boxes to the image, drops degenerate ones.

  Returns (clipped boxes, keep [K] bool); each change goes to `report` under
  `where` (the file), naming the object by `labels[k]`.
  """
  boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
  clipped = np.clip(boxes, 0.0, np.array([width, height, width, height],
                                         np.float32))
  keep = (clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1])
  moved = np.abs(clipped - boxes).max(axis=1, initial=0.0) > 1e-3
  size = f"{width}x{height} (WxH) image"
  for k in np.flatnonzero(~keep):
    outside = " after clipping to the " + size if moved[k] else ""
    report.dropped.append((where, f"{labels[k]} box {_box_text(boxes[k])} "
                           f"has zero or negative width or height{outside}"))
  for k in np.flatnonzero(keep & moved):
    report.clipped.append((where, f"{labels[k]} box {_box_text(boxes[k])} "
                           f"reaches outside the {size}: clipped to "
                           f"{_box_text(clipped[k])}"))
  return clipped, keep


def image_boxes(image_path: str, boxes, classes, crowd, area,
                keep) -> ImageBoxes:
  keep = np.asarray(keep, bool)
  return ImageBoxes(
      image_path=image_path,
      boxes=np.asarray(boxes, np.float32).reshape(-1, 4)[keep],
      classes=np.asarray(classes, np.int32).reshape(-1)[keep],
      crowd=np.asarray(crowd, bool).reshape(-1)[keep],
      area=np.asarray(area, np.float32).reshape(-1)[keep])


def real_sizes(paths: Sequence[str], full_decode: bool):
  """[((width, height) or None, why unusable or None)] per image path."""
  with concurrent.futures.ThreadPoolExecutor() as pool:
    return list(pool.map(lambda p: image_size(p, full_decode), paths))


# ----------------------------------------------------------------------------
# Records: the boxes of all images in flat arrays, sliced per example.


def box_records(images: Sequence[ImageBoxes], split: str,
                layout: str) -> Records:
  """Rows (image path, box offset and count, image_id) plus `decode`."""
  if not images:
    raise ValueError(f"No usable images in split {split!r}. {layout}")
  counts = np.array([len(i.classes) for i in images], np.int64)
  starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
  flat = {name: tf.constant(np.concatenate([getattr(i, name) for i in images]))
          for name in ("boxes", "classes", "crowd", "area")}
  table = {"image_path": np.array([i.image_path for i in images], object),
           "box_start": starts, "box_count": counts,
           "image_id": np.arange(len(images), dtype=np.int32)}
  return Records(num=len(images), table=table,
                 decode=functools.partial(decode_row, flat))


def decode_row(flat: Dict[str, tf.Tensor], row) -> dict:
  start, count = row["box_start"], row["box_count"]
  example = {name: value[start:start + count] for name, value in flat.items()}
  example["image"] = decode_image(tf.io.read_file(row["image_path"]))
  example["image_id"] = tf.cast(row["image_id"], tf.int32)
  return example


# ----------------------------------------------------------------------------
# voc_folder.


class AnnotationError(ValueError):
  """An annotation file that cannot be read; the message says why."""


@dataclasses.dataclass
class VocFile:
  """A parsed VOC XML: <size> (None when absent or 0) and its objects."""
  size: Optional[Tuple[int, int]]  # (width, height).
  names: List[str]
  boxes: np.ndarray  # float32 [K, 4], the XML's 1-based corners.
  difficult: np.ndarray  # bool [K].


def _number(element, path: str, what: str) -> float:
  text = element.findtext(path)
  try:
    return float(text)
  except (TypeError, ValueError):
    raise AnnotationError(f"{what}: <{path}> is {text!r}, not a number") \
        from None


def _voc_size(root) -> Optional[Tuple[int, int]]:
  if root.find("size") is None:
    return None
  width = _number(root, "size/width", "<size>")
  height = _number(root, "size/height", "<size>")
  return (int(width), int(height)) if width > 0 and height > 0 else None


def parse_voc_xml(path: Path) -> VocFile:
  """Reads one VOC XML with xml.etree; AnnotationError says what is wrong."""
  try:
    root = ET.parse(path).getroot()
  except (ET.ParseError, OSError) as e:
    raise AnnotationError(f"not a readable XML file ({e})") from None
  names, boxes, difficult = [], [], []
  for k, obj in enumerate(root.findall("object")):
    name = (obj.findtext("name") or "").strip()
    if not name:
      raise AnnotationError(f"<object> {k} has no <name>")
    what = f"<object> {k} ({name})"
    boxes.append([_number(obj, f"bndbox/{c}", what)
                  for c in ("xmin", "ymin", "xmax", "ymax")])
    names.append(name)
    difficult.append(_number(obj, "difficult", what) != 0
                     if obj.find("difficult") is not None else False)
  return VocFile(_voc_size(root), names,
                 np.array(boxes, np.float32).reshape(-1, 4),
                 np.array(difficult, bool))


def class_map_of(config: ml_collections.ConfigDict) -> Dict[str, str]:
  """config.class_map as {name in the files: class name}."""
  if config.class_map is None:
    return {}
  try:
    pairs = {str(a): str(b) for a, b in config.class_map}
  except (TypeError, ValueError):
    raise ValueError(f"config.class_map={config.class_map!r} must be ((name "
                     "in the annotations, class name), ...), e.g. "
                     "((\"Cat\", \"cat\"),).") from None
  return pairs


def voc_pairs(root: Path, split: str, images, folders: Tuple[Path, Path],
              report: Report):
  """[(stem, image path, xml path)] of a split; missing files are skipped."""
  pairs = []
  split_file = root / "splits" / f"{split}.txt"
  image_dir, xml_dir = folders
  for stem in read_split(root, split, VOC_LAYOUT):
    image, xml = images.get(stem, []), xml_dir / f"{stem}.xml"
    if len(image) != 1:
      where = str(image[0]) if image else f"{image_dir / stem}.<ext>"
      why = (f"several images for stem {stem!r}: {[p.name for p in image]}"
             if image else f"no image for stem {stem!r} (listed in "
             f"{split_file})")
      report.skipped.append((where, why))
    elif not xml.is_file():
      report.skipped.append((str(xml), f"no annotation for stem {stem!r} "
                             f"(listed in {split_file})"))
    else:
      pairs.append((stem, str(image[0]), xml))
  return pairs


def read_voc_split(pairs, full_decode: bool, report: Report):
  """[(image path, xml path, VocFile, (width, height))] of usable files."""
  sizes = real_sizes([image for _, image, _ in pairs], full_decode)
  usable = []
  for (_, image, xml), (size, why) in zip(pairs, sizes):
    if why:
      report.skipped.append((image, why))
      continue
    try:
      parsed = parse_voc_xml(xml)
    except AnnotationError as e:
      report.skipped.append((str(xml), str(e)))
      continue
    if parsed.size is not None and parsed.size != tuple(size):
      report.skipped.append((str(xml), (
          f"<size> says {parsed.size[0]}x{parsed.size[1]} (WxH) but the "
          f"image {image} is {size[0]}x{size[1]}; fix the XML or the image")))
      continue
    usable.append((image, xml, parsed, tuple(size)))
  return usable


def voc_class_names(config, files, class_map) -> List[str]:
  """config.class_names, else the sorted (mapped) names of every object."""
  if config.class_names is not None:
    names = [str(n) for n in config.class_names]
    if not names or len(set(names)) != len(names):
      raise ValueError(f"config.class_names={tuple(names)} must be a "
                       "non-empty list of distinct names.")
    return names
  names = sorted({class_map.get(n, n) for split in files for f in split
                  for n in f[2].names})
  if not names:
    raise ValueError("voc_folder: no <object> in any annotation, so there "
                     "are no class names; set config.class_names. "
                     + VOC_LAYOUT)
  return names


def check_voc_names(files, class_map, class_names) -> None:
  """ValueError naming each file with an object name that is no class."""
  known = set(class_names)
  bad = [(str(xml), f"object name {name!r}") for split in files
         for _, xml, parsed, _ in split for name in parsed.names
         if class_map.get(name, name) not in known]
  if bad:
    raise ValueError(
        f"voc_folder: {len(bad)} object(s) have a name that is not one of "
        f"config.class_names={tuple(class_names)}:\n{_lines(bad)}\nAdd the "
        "name to config.class_names or map it with config.class_map "
        "((name in the XML, class name), ...).")


def voc_image_boxes(image, xml, parsed: VocFile, size, class_map,
                    class_index, report: Report) -> ImageBoxes:
  """1-based corners -> 0-based continuous xyxy, clipped and checked."""
  names = [class_map.get(n, n) for n in parsed.names]
  boxes = parsed.boxes - np.array([1, 1, 0, 0], np.float32)
  labels = [f"<object> {k} ({n})" for k, n in enumerate(parsed.names)]
  boxes, keep = clean_boxes(boxes, size[0], size[1], labels, str(xml), report)
  area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
  return image_boxes(image, boxes, [class_index[n] for n in names],
                     parsed.difficult, area, keep)


@register_dataset("voc_folder")
def voc_folder(config: ml_collections.ConfigDict) -> SplitSource:
  """Pascal VOC XML boxes named by split files; see the module docstring."""
  root = resolve_root(config.root)
  image_dir, xml_dir = root / config.images_dir, root / config.annotations_dir
  images = index_files(image_dir, normalise_extensions(config.extensions),
                       VOC_LAYOUT)
  if not xml_dir.is_dir():
    raise FileNotFoundError(f"Annotation folder {xml_dir} does not exist "
                            f"(config.annotations_dir="
                            f"{config.annotations_dir!r}). {VOC_LAYOUT}")
  report, class_map = Report(), class_map_of(config)
  splits = (config.train_split, config.eval_split or "val")
  files = [read_voc_split(voc_pairs(root, s, images, (image_dir, xml_dir),
                                    report),
                          config.verify_images, report) for s in splits]
  class_names = voc_class_names(config, files, class_map)
  check_voc_names(files, class_map, class_names)
  index = {name: k for k, name in enumerate(class_names)}
  records = [box_records([voc_image_boxes(*f, class_map, index, report)
                          for f in split_files], split, VOC_LAYOUT)
             for split, split_files in zip(splits, files)]
  skipped = report.finish("voc_folder", config.strict)
  return SplitSource.from_records(class_names, train=records[0],
                                  eval=records[1], skipped=skipped,
                                  label_kind="boxes")


# ----------------------------------------------------------------------------
# coco_json.


def load_coco_json(path: Path) -> dict:
  """The parsed file; a missing or malformed file raises naming it."""
  if not path.is_file():
    raise FileNotFoundError(f"COCO annotation file {path} does not exist "
                            f"(config.annotations). {COCO_LAYOUT}")
  try:
    with open(path) as f:
      content = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f"COCO annotation file {path} is not valid JSON ({e})."
                     ) from None
  missing = [k for k in ("images", "annotations", "categories")
             if not isinstance(content, dict) or k not in content]
  if missing:
    raise ValueError(f"COCO annotation file {path} has no {missing} list. "
                     f"{COCO_LAYOUT}")
  return content


def coco_categories(path: Path, content: dict) -> List[Tuple[int, str]]:
  """[(category id, name)] sorted by id."""
  try:
    categories = sorted((int(c["id"]), str(c["name"]))
                        for c in content["categories"])
  except (KeyError, TypeError, ValueError):
    raise ValueError(f"COCO annotation file {path}: every category needs an "
                     "integer \"id\" and a \"name\".") from None
  ids = [i for i, _ in categories]
  if not categories or len(set(ids)) != len(ids):
    raise ValueError(f"COCO annotation file {path}: categories must be "
                     f"non-empty with distinct ids, got ids {ids}.")
  return categories


def check_same_categories(paths, categories, config) -> List[str]:
  """Class names; both splits and config.class_names (if set) must agree."""
  if categories[0] != categories[1]:
    raise ValueError(f"The categories differ between {paths[0]} "
                     f"({categories[0]}) and {paths[1]} ({categories[1]}); "
                     "both splits need the same (id, name) list.")
  names = [name for _, name in categories[0]]
  if config.class_names is not None and list(config.class_names) != names:
    raise ValueError(f"config.class_names={tuple(config.class_names)} differs "
                     f"from the categories of {paths[0]} in id order "
                     f"({tuple(names)}); leave config.class_names unset.")
  return names


def group_annotations(path: Path, content: dict, image_ids, category_index,
                      report: Report) -> Dict[int, List[dict]]:
  """{image id: [annotations]}; an unknown category id raises."""
  groups: Dict[int, List[dict]] = {}
  bad = []
  for ann in content["annotations"]:
    if ann.get("category_id") not in category_index:
      bad.append((str(path), f"annotation {ann.get('id')} has category_id "
                  f"{ann.get('category_id')!r}"))
    elif ann.get("image_id") not in image_ids:
      report.dropped.append((str(path), f"annotation {ann.get('id')}: its "
                             f"image_id {ann.get('image_id')!r} is not in "
                             "\"images\""))
    else:
      groups.setdefault(ann["image_id"], []).append(ann)
  if bad:
    raise ValueError(f"{len(bad)} COCO annotation(s) name a category that "
                     f"is not in \"categories\" (ids "
                     f"{sorted(category_index)}):\n{_lines(bad)}")
  return groups


def coco_image_boxes(path: Path, image_path: str, size, anns,
                     category_index, report: Report) -> ImageBoxes:
  """[x, y, w, h] -> xyxy, clipped and checked; crowd from iscrowd."""
  where = f"{path} (image {Path(image_path).name})"
  try:
    xywh = np.array([[float(v) for v in a["bbox"]] for a in anns],
                    np.float32).reshape(-1, 4)
  except (KeyError, TypeError, ValueError):
    raise ValueError(f"{where}: every annotation needs \"bbox\": [x, y, w, "
                     "h] of 4 numbers.") from None
  boxes = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
  labels = [f"annotation {a.get('id')}" for a in anns]
  boxes, keep = clean_boxes(boxes, size[0], size[1], labels, where, report)
  area = [float(a.get("area", w * h)) for a, (_, _, w, h) in zip(anns, xywh)]
  return image_boxes(image_path, boxes,
                     [category_index[a["category_id"]] for a in anns],
                     [bool(a.get("iscrowd", 0)) for a in anns], area, keep)


def coco_images(path: Path, content: dict, image_dir: Path) -> List[dict]:
  """The JSON's images sorted by id, with "path"; duplicate ids raise."""
  try:
    images = sorted(({"id": im["id"], "path": str(image_dir / im["file_name"]),
                      "size": (im.get("width"), im.get("height"))}
                     for im in content["images"]), key=lambda im: im["id"])
  except (KeyError, TypeError):
    raise ValueError(f"COCO annotation file {path}: every image needs an "
                     "\"id\" and a \"file_name\".") from None
  ids = [im["id"] for im in images]
  if len(set(ids)) != len(ids):
    raise ValueError(f"COCO annotation file {path} lists an image id twice.")
  return images


def read_coco_split(path: Path, content, image_dir: Path, category_index,
                    full_decode: bool, report: Report) -> List[ImageBoxes]:
  images = coco_images(path, content, image_dir)
  groups = group_annotations(path, content, {im["id"] for im in images},
                             category_index, report)
  sizes = real_sizes([im["path"] for im in images], full_decode)
  result = []
  for image, (size, why) in zip(images, sizes):
    if why:
      report.skipped.append((image["path"], why))
      continue
    given = image["size"]
    if None not in given and tuple(int(v) for v in given) != tuple(size):
      report.skipped.append((image["path"], (
          f"{path} gives width x height {given[0]}x{given[1]} but the image "
          f"is {size[0]}x{size[1]}; fix the JSON or the image")))
      continue
    result.append(coco_image_boxes(path, image["path"], size,
                                   groups.get(image["id"], []),
                                   category_index, report))
  return result


def split_path(root: Path, template: str, split: str) -> Path:
  return root / str(template).format(split=split)


@register_dataset("coco_json")
def coco_json(config: ml_collections.ConfigDict) -> SplitSource:
  """COCO instances JSON per split; see the module docstring."""
  root = resolve_root(config.root)
  splits = (config.train_split, config.eval_split or "val")
  paths = [split_path(root, config.annotations, s) for s in splits]
  contents = [load_coco_json(p) for p in paths]
  categories = [coco_categories(p, c) for p, c in zip(paths, contents)]
  class_names = check_same_categories(paths, categories, config)
  category_index = {cid: k for k, (cid, _) in enumerate(categories[0])}
  report = Report()
  records = []
  for split, path, content in zip(splits, paths, contents):
    image_dir = split_path(root, config.images_dir, split)
    images = read_coco_split(path, content, image_dir, category_index,
                             config.verify_images, report)
    records.append(box_records(images, split, COCO_LAYOUT))
  skipped = report.finish("coco_json", config.strict)
  return SplitSource.from_records(class_names, train=records[0],
                                  eval=records[1], skipped=skipped,
                                  label_kind="boxes")


# ----------------------------------------------------------------------------
# TFDS: voc/2007, voc/2012, coco/2017.


@dataclasses.dataclass(frozen=True)
class TfdsDetection:
  """How to read one TFDS detection dataset's boxes."""
  eval_split: str
  crowd_key: str  # The objects' bool feature that marks crowd / difficult.
  area_key: Optional[str]  # The objects' area feature, if any.
  # TFDS VOC divides VOC's 1-based corners by the size as they are; COCO's
  # [x, y, w, h] are 0-based already.
  one_based: bool


TFDS_DETECTION = {
    "voc/2007": TfdsDetection("test", "is_difficult", None, True),
    "voc/2012": TfdsDetection("validation", "is_difficult", None, True),
    "coco/2017": TfdsDetection("validation", "is_crowd", "area", False),
}


def tfds_boxes(bbox: tf.Tensor, height_width: tf.Tensor,
               one_based: bool) -> tf.Tensor:
  """TFDS [K, 4] (ymin, xmin, ymax, xmax) in [0, 1] -> xyxy pixels."""
  height, width = tf.unstack(tf.cast(height_width, tf.float32))
  ymin, xmin, ymax, xmax = tf.unstack(tf.reshape(bbox, [-1, 4]), axis=1)
  shift = 1.0 if one_based else 0.0
  boxes = tf.stack([xmin * width - shift, ymin * height - shift,
                    xmax * width, ymax * height], axis=1)
  return tf.clip_by_value(boxes, 0.0, tf.stack([width, height, width, height]))


def decode_tfds_example(spec: TfdsDetection, row) -> dict:
  """Encoded image + objects -> example; degenerate boxes dropped."""
  image = decode_image(row["image"])
  boxes = tfds_boxes(row["bbox"], tf.shape(image)[:2], spec.one_based)
  keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
  box_area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
  area = tf.cast(row["area"], tf.float32) if "area" in row else box_area
  columns = {"boxes": boxes, "classes": tf.cast(row["label"], tf.int32),
             "crowd": tf.cast(row["crowd"], tf.bool), "area": area}
  example = {k: tf.boolean_mask(v, keep) for k, v in columns.items()}
  example.update(image=image, image_id=tf.cast(row["image_id"], tf.int32))
  return example


def load_tfds_split(name: str, split: str, config: ml_collections.ConfigDict):
  """(Records streaming encoded rows in file order, info) for one split."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  spec = TFDS_DETECTION[name]
  objects = {"bbox": True, "label": True, spec.crowd_key: True}
  if spec.area_key:
    objects[spec.area_key] = True
  decoders = tfds.decode.PartialDecoding(
      {"image": True, "objects": objects},
      decoders={"image": tfds.decode.SkipDecoding()})
  ds, info = tfds.load(name, split=split, data_dir=config.tfds_data_dir,
                       with_info=True, shuffle_files=False, decoders=decoders)
  num = count(ds, info, split)

  def row(index, ex):
    out = {"image": ex["image"], "bbox": ex["objects"]["bbox"],
           "label": ex["objects"]["label"],
           "crowd": ex["objects"][spec.crowd_key], "image_id": index}
    if spec.area_key:
      out["area"] = ex["objects"][spec.area_key]
    return out

  stream = ds.enumerate().map(row)
  return Records(num=num, stream=stream,
                 decode=functools.partial(decode_tfds_example, spec)), info


def load_tfds_detection(name: str,
                        config: ml_collections.ConfigDict) -> SplitSource:
  train, info = load_tfds_split(name, config.train_split, config)
  evaluation, _ = load_tfds_split(
      name, config.eval_split or TFDS_DETECTION[name].eval_split, config)
  names = list(info.features["objects"]["label"].names)
  return SplitSource.from_records(names, train=train, eval=evaluation,
                                  label_kind="boxes")


def _make_tfds_builder(name: str):
  def builder(config: ml_collections.ConfigDict) -> SplitSource:
    return load_tfds_detection(name, config)

  builder.__name__ = builder.__qualname__ = name.replace("/", "_")
  builder.__doc__ = f"TFDS `{name}` boxes, read by `load_tfds_detection`."
  return builder


for _name in TFDS_DETECTION:
  register_dataset(_name)(_make_tfds_builder(_name))


# ----------------------------------------------------------------------------
# Ground truth for COCOeval.


def category_id(class_index: int) -> int:
  """COCO category id of class k: k + 1 (as tasks.coco_eval numbers them)."""
  return int(class_index) + 1


def _ground_truth_rows(records: Records) -> tf.data.Dataset:
  """The split's examples with the image replaced by its (H, W)."""
  def strip(example):
    out = {k: v for k, v in example.items() if k != "image"}
    out["size"] = tf.shape(example["image"])[:2]
    return out

  return records.examples().map(strip, num_parallel_calls=tf.data.AUTOTUNE,
                                deterministic=True)


def coco_ground_truth(source_or_pipeline) -> Dict[str, Any]:
  """The eval split in COCO format, for pycocotools' COCOeval.

  {"images": [{"id", "width", "height"}], "annotations": [{"id", "image_id",
  "category_id", "bbox": [x, y, w, h], "area", "iscrowd"}], "categories":
  [{"id", "name"}]}: image ids are the eval batches' "image_id", boxes are in
  original pixels, category ids are class index + 1 (`category_id`), and
  annotation ids start at 1 (COCOeval reads id 0 as "unmatched"). Crowd
  boxes (COCO iscrowd, VOC difficult) have iscrowd 1; area is the dataset's
  (COCO's mask area) where it has one, else the box area. Decodes each eval
  image once to learn its size, unless a Pipeline with `cache` holds them.
  """
  source = getattr(source_or_pipeline, "source", source_or_pipeline)
  if source.label_kind != "boxes":
    raise ValueError(f"coco_ground_truth needs a source with label_kind "
                     f"'boxes', got {source.label_kind!r}.")
  records = source_or_pipeline.records("eval")  # A Pipeline's may be cached.
  images, annotations = [], []
  for example in _ground_truth_rows(records).as_numpy_iterator():
    image_id = int(example["image_id"])
    height, width = (int(v) for v in example["size"])
    images.append({"id": image_id, "width": width, "height": height})
    annotations += _annotations(example, image_id, len(annotations))
  categories = [{"id": category_id(k), "name": name}
                for k, name in enumerate(source.class_names)]
  return {"images": images, "annotations": annotations,
          "categories": categories}


def _annotations(example, image_id: int, done: int) -> List[dict]:
  boxes = np.asarray(example["boxes"], np.float64).reshape(-1, 4)
  num = len(boxes)
  crowd = example.get("crowd", np.zeros(num, bool))
  widths, heights = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
  area = example.get("area", widths * heights)
  return [{"id": done + k + 1, "image_id": image_id,
           "category_id": category_id(example["classes"][k]),
           "bbox": [float(boxes[k, 0]), float(boxes[k, 1]),
                    float(widths[k]), float(heights[k])],
           "area": float(area[k]), "iscrowd": int(bool(crowd[k]))}
          for k in range(num)]
