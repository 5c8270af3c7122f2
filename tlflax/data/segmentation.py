"""Segmentation datasets: images with a per-pixel class map (label_kind "mask").

- `mask_folder`: <root>/images/<stem>.<ext> with <root>/<masks_dir>/<stem>.png,
  the split's stems listed in <root>/splits/<split>.txt.
- `oxford_iiit_pet`: TFDS, the pet trimaps (1 pet, 2 background, 3 border).
- `cityscapes`: TFDS `cityscapes/semantic_segmentation` (manual download),
  label ids mapped to the 19 train ids.

A mask holds raw values; `config.mask_map` ((raw, class index or
ignore_index), ...) turns them into classes of `config.class_names`. The
constants below are ready-made (class_names, mask_map) pairs, written for the
default `ignore_index=255`:

  cfg.class_names, cfg.mask_map = segmentation.PETS_TRIMAP_2CLASS

`mask_folder` checks every image/mask pair when it is built (readable, same
size, only mapped values) and raises one ValueError naming every bad file,
so a broken pair never fails inside tf.data. TFDS masks are checked as they
are decoded (size and values), naming the example.
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import ml_collections
import numpy as np
import tensorflow as tf

from tlflax.data import verify
from tlflax.data.folder import normalise_extensions, resolve_root
from tlflax.data.preprocess import decode_image
from tlflax.data.registry import register_dataset
from tlflax.data.source import Records, SplitSource
from tlflax.data.tfds_datasets import count

IGNORE = 255  # The ignore value the constants below are written for.

# Oxford-IIIT Pet trimaps: 1 pet, 2 background, 3 border (the uncertain band
# around the outline). Two classes with the border ignored, or three.
PETS_TRIMAP_2CLASS = (("background", "pet"), ((1, 1), (2, 0), (3, IGNORE)))
PETS_TRIMAP_3CLASS = (("background", "pet", "border"),
                      ((1, 1), (2, 0), (3, 2)))

# Cityscapes label ids (gtFine *_labelIds.png, 0..33) -> the 19 train ids of
# the benchmark; every other id is ignored (cityscapesScripts' labels.py).
CITYSCAPES_CLASSES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light",
    "traffic sign", "vegetation", "terrain", "sky", "person", "rider", "car",
    "truck", "bus", "train", "motorcycle", "bicycle")
_CITYSCAPES_EVAL_IDS = (7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26,
                        27, 28, 31, 32, 33)
CITYSCAPES_19 = (CITYSCAPES_CLASSES, tuple(
    (label_id, _CITYSCAPES_EVAL_IDS.index(label_id)
     if label_id in _CITYSCAPES_EVAL_IDS else IGNORE)
    for label_id in range(34)))

MASK_MODES = ("L", "P", "1", "I;16", "I")  # PIL modes holding one integer.
MAX_RAW = 65535  # Largest raw mask value a mapping may name (16-bit PNGs).
MAX_LISTED = 20  # Bad files named in one error; the rest are counted.
LAYOUT = ("The mask_folder dataset expects <root>/images/<stem>.<ext>, "
          "<root>/<masks_dir>/<stem>.png (one channel of class values, the "
          "image's size) and <root>/splits/<split>.txt listing one stem per "
          "line.")


# ----------------------------------------------------------------------------
# Raw mask values -> class indices.


@dataclasses.dataclass(frozen=True)
class MaskMapping:
  """A lookup table raw value -> class index (or ignore_index).

  `known[v]` says whether raw value v is mapped at all; unmapped values are
  an error (a wrong mapping would otherwise train on silently dropped pixels).
  """
  class_names: Tuple[str, ...]
  table: np.ndarray  # [num raw values]; uint8 where all fits, else int32.
  known: np.ndarray  # [num raw values] bool.
  ignore_index: int
  identity: bool

  def unknown(self, values: np.ndarray) -> List[int]:
    """The values in `values` (unique raw values) that are not mapped."""
    inside = (values >= 0) & (values < len(self.known))
    mapped = np.zeros(len(values), bool)
    mapped[inside] = self.known[values[inside]]
    return [int(v) for v in values[~mapped]]

  def why_unknown(self, values: Sequence[int]) -> str:
    if self.identity:
      return (f"values {values} are neither class indices 0.."
              f"{len(self.class_names) - 1} ({len(self.class_names)} "
              f"config.class_names) nor config.ignore_index="
              f"{self.ignore_index}; set config.mask_map to map raw values "
              "to classes")
    mapped = [int(v) for v in np.flatnonzero(self.known)]
    return (f"values {values} are not in config.mask_map (which maps "
            f"{mapped}); add them to config.mask_map")

  def lookup(self, raw: tf.Tensor) -> tf.Tensor:
    """Raw [H, W] integer map -> class map, as `table`'s dtype."""
    return tf.gather(tf.constant(self.table), tf.cast(raw, tf.int32))


def _check_class_names(class_names) -> Tuple[str, ...]:
  if class_names is None or not len(class_names):
    raise ValueError("config.class_names is not set: a segmentation dataset "
                     "needs its class list, e.g. ('background', 'pet') (or "
                     "use a constant such as segmentation.PETS_TRIMAP_2CLASS "
                     "for class_names and mask_map).")
  names = tuple(str(n) for n in class_names)
  if len(set(names)) != len(names):
    raise ValueError(f"config.class_names={names} has duplicates.")
  return names


def _identity_pairs(num_classes: int, ignore_index: int):
  pairs = [(v, v) for v in range(num_classes)]
  return pairs + ([(ignore_index, ignore_index)] if ignore_index >= 0 else [])


def _check_pairs(mask_map, num_classes: int, ignore_index: int):
  """((raw, target), ...) with ints, raw >= 0, unique, targets valid."""
  try:
    pairs = [(int(raw), int(target)) for raw, target in mask_map]
  except (TypeError, ValueError) as e:
    raise ValueError(f"config.mask_map={mask_map!r} must be ((raw value, "
                     "class index), ...) pairs of integers, e.g. ((1, 1), "
                     f"(2, 0), (3, {ignore_index})).") from e
  raws = collections.Counter(raw for raw, _ in pairs)
  problems = []
  if max(raws.values(), default=1) > 1:
    problems.append(f"raw values listed twice: "
                    f"{sorted(r for r, n in raws.items() if n > 1)}")
  outside = sorted(r for r in raws if not 0 <= r <= MAX_RAW)
  if outside:
    problems.append(f"raw values {outside} outside 0..{MAX_RAW}")
  bad = [t for _, t in pairs if t != ignore_index and not 0 <= t < num_classes]
  if bad:
    problems.append(f"targets {bad} are neither class indices 0.."
                    f"{num_classes - 1} nor config.ignore_index={ignore_index}")
  if problems:
    raise ValueError(f"config.mask_map={tuple(mask_map)}: "
                     + "; ".join(problems) + ".")
  return pairs


def mask_mapping(class_names, mask_map, ignore_index: int) -> MaskMapping:
  """Checks (class_names, mask_map, ignore_index) and builds the table.

  mask_map None is the identity: raw v is class v, ignore_index stays ignored.
  """
  names = _check_class_names(class_names)
  ignore_index = int(ignore_index)
  if 0 <= ignore_index < len(names):
    raise ValueError(f"config.ignore_index={ignore_index} is a class index "
                     f"(there are {len(names)} classes); use a value outside "
                     f"0..{len(names) - 1}, e.g. 255.")
  if mask_map is None:
    pairs = _identity_pairs(len(names), ignore_index)
  else:
    pairs = _check_pairs(mask_map, len(names), ignore_index)
  size = max([256] + [raw + 1 for raw, _ in pairs])
  fits_uint8 = len(names) <= 256 and 0 <= ignore_index <= 255
  table = np.full(size, ignore_index, np.uint8 if fits_uint8 else np.int32)
  known = np.zeros(size, bool)
  for raw, target in pairs:
    table[raw], known[raw] = target, True
  return MaskMapping(names, table, known, ignore_index, mask_map is None)


def config_mapping(config: ml_collections.ConfigDict,
                   default=None) -> MaskMapping:
  """The config's mapping; unset class_names/mask_map take `default`'s."""
  names, pairs = default if default is not None else (None, None)
  return mask_mapping(
      config.class_names if config.class_names is not None else names,
      config.mask_map if config.mask_map is not None else pairs,
      config.ignore_index)


# ----------------------------------------------------------------------------
# mask_folder.


def read_split(root: Path, split: str, layout: str = LAYOUT) -> List[str]:
  """The stems listed in <root>/splits/<split>.txt (blank lines skipped).

  `layout` ends the error messages: the expected layout of the dataset.
  """
  path = root / "splits" / f"{split}.txt"
  if not path.is_file():
    found = sorted(p.name for p in (root / "splits").glob("*.txt"))
    raise FileNotFoundError(f"Split file {path} does not exist (split files "
                            f"in {root / 'splits'}: {found}). {layout}")
  stems = [line.strip() for line in path.read_text().splitlines()]
  stems = [s for s in stems if s]
  if not stems:
    raise ValueError(f"Split file {path} lists no stems. {layout}")
  repeated = sorted(s for s, n in collections.Counter(stems).items() if n > 1)
  if repeated:
    raise ValueError(f"Split file {path} lists {repeated[:MAX_LISTED]} more "
                     "than once; list each stem once.")
  return stems


def index_files(folder: Path, extensions: frozenset,
                layout: str = LAYOUT) -> Dict[str, List[Path]]:
  """{stem: [files with that stem and an allowed extension]} of a folder."""
  if not folder.is_dir():
    raise FileNotFoundError(f"Folder {folder} does not exist. {layout}")
  index: Dict[str, List[Path]] = {}
  for path in sorted(folder.iterdir()):
    if path.is_file() and path.suffix.lower() in extensions:
      index.setdefault(path.stem, []).append(path)
  return index


def pair_files(stems, images, masks, split_file: Path,
               folders: Tuple[Path, Path]):
  """([(image, mask)], problems) for the stems of one split."""
  pairs, problems = [], []
  image_dir, mask_dir = folders
  for stem in stems:
    image, mask = images.get(stem, []), masks.get(stem, [])
    if len(image) > 1:
      problems.append((str(image[0]), f"several images for stem {stem!r}: "
                       f"{[p.name for p in image]}; keep one"))
    elif not image:
      problems.append((f"{image_dir / stem}.<ext>", "missing image (stem "
                       f"listed in {split_file}); add it or remove the stem"))
    if not mask:
      problems.append((f"{mask_dir / stem}.png", "missing mask (stem listed "
                       f"in {split_file}); add it or remove the stem"))
    if len(image) == 1 and len(mask) == 1:
      pairs.append((str(image[0]), str(mask[0])))
  return pairs, problems


def image_size(path: str, full_decode: bool):
  """((width, height), None) or (None, why the image is unusable)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  if full_decode:
    reason = verify.check_image(path)
    if reason:
      return None, reason
  try:
    with Image.open(path) as image:
      return image.size, None
  except Exception as e:  # pylint: disable=broad-except
    return None, f"unreadable image ({type(e).__name__}: {e})"


def read_mask(path: str):
  """(raw values [H, W] int32, None) or (None, why the mask is unusable)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  try:
    with Image.open(path) as mask:
      if mask.mode not in MASK_MODES:
        return None, (f"mask mode {mask.mode}: a mask must be one channel of "
                      f"class values (PIL mode {', '.join(MASK_MODES)}); "
                      "convert colour-coded masks to class indices")
      return np.asarray(mask).astype(np.int32), None
  except Exception as e:  # pylint: disable=broad-except
    return None, f"unreadable mask ({type(e).__name__}: {e})"


def unique_values(raw: np.ndarray) -> np.ndarray:
  """The distinct values of a mask; bincount is ~10x faster than np.unique."""
  if raw.size and raw.min() >= 0 and raw.max() < 1 << 16:
    return np.flatnonzero(np.bincount(raw.reshape(-1)))
  return np.unique(raw)


def check_pair(image_path: str, mask_path: str, mapping: MaskMapping,
               full_decode: bool) -> List[Tuple[str, str]]:
  """[(file, what is wrong with it and how to fix it)], empty when usable."""
  size, image_problem = image_size(image_path, full_decode)
  raw, mask_problem = read_mask(mask_path)
  problems = [(p, r) for p, r in ((image_path, image_problem),
                                  (mask_path, mask_problem)) if r]
  if problems:
    return problems
  if raw.shape[::-1] != tuple(size):
    return [(mask_path, f"mask is {raw.shape[1]}x{raw.shape[0]} (WxH) but "
             f"its image {image_path} is {size[0]}x{size[1]}; a mask must "
             "have its image's size")]
  unknown = mapping.unknown(unique_values(raw))
  return [(mask_path, mapping.why_unknown(unknown))] if unknown else []


def check_pairs(pairs, mapping: MaskMapping, full_decode: bool):
  """Every pair's problems, checked in a thread pool (PIL drops the GIL)."""
  with concurrent.futures.ThreadPoolExecutor() as pool:
    results = pool.map(lambda p: check_pair(*p, mapping, full_decode), pairs)
    return [problem for result in results for problem in result]


def raise_problems(root: Path, problems: List[Tuple[str, str]]) -> None:
  if not problems:
    return
  lines = [f"  {path}: {reason}" for path, reason in problems[:MAX_LISTED]]
  if len(problems) > MAX_LISTED:
    lines.append(f"  ... and {len(problems) - MAX_LISTED} more.")
  raise ValueError(f"mask_folder {root}: {len(problems)} problem(s) with "
                   "image/mask files:\n" + "\n".join(lines) + f"\n{LAYOUT}")


def _read_raw_mask(path) -> np.ndarray:
  from PIL import Image  # pylint: disable=g-import-not-at-top
  path = np.asarray(path).item()  # bytes inside tf.data, str when eager.
  with Image.open(path.decode() if isinstance(path, bytes) else path) as mask:
    return np.asarray(mask).astype(np.int32)


def decode_pair(mapping: MaskMapping, record) -> dict:
  """{"image_path", "mask_path"} -> {"image": uint8 [H,W,3], "label": [H,W]}.

  Masks are read with PIL (in tf.numpy_function): TF's PNG decoder turns
  palette PNGs (the VOC format) into colours, PIL keeps the indices.
  """
  raw = tf.numpy_function(_read_raw_mask, [record["mask_path"]], tf.int32,
                          stateful=False)
  raw.set_shape([None, None])
  return {"image": decode_image(tf.io.read_file(record["image_path"])),
          "label": mapping.lookup(raw)}


def folder_records(pairs, mapping: MaskMapping) -> Records:
  table = {"image_path": np.array([i for i, _ in pairs], dtype=object),
           "mask_path": np.array([m for _, m in pairs], dtype=object)}
  return Records(num=len(pairs), decode=functools.partial(decode_pair, mapping),
                 table=table)


@register_dataset("mask_folder")
def mask_folder(config: ml_collections.ConfigDict) -> SplitSource:
  """Image + PNG mask pairs named by split files; see the module docstring."""
  root = resolve_root(config.root)
  mapping = config_mapping(config)
  folders = (root / "images", root / config.masks_dir)
  images = index_files(folders[0], normalise_extensions(config.extensions))
  masks = index_files(folders[1], frozenset({".png"}))
  splits, problems = [], []
  for split in (config.train_split, config.eval_split or "val"):
    split_file = root / "splits" / f"{split}.txt"
    pairs, missing = pair_files(read_split(root, split), images, masks,
                                split_file, folders)
    problems += missing + check_pairs(pairs, mapping, config.verify_images)
    splits.append(pairs)
  raise_problems(root, problems)
  return SplitSource.from_records(
      mapping.class_names, train=folder_records(splits[0], mapping),
      eval=folder_records(splits[1], mapping), label_kind="mask")


# ----------------------------------------------------------------------------
# TFDS datasets.


@dataclasses.dataclass(frozen=True)
class TfdsSegmentation:
  """Where a TFDS segmentation dataset keeps its image, mask and example id."""
  tfds_name: str
  image_key: str
  mask_key: str
  id_key: str
  eval_split: str
  default_mapping: tuple  # (class_names, mask_map)


TFDS_SEGMENTATION = {
    "oxford_iiit_pet": TfdsSegmentation(
        "oxford_iiit_pet", "image", "segmentation_mask", "file_name", "test",
        PETS_TRIMAP_2CLASS),
    "cityscapes": TfdsSegmentation(
        "cityscapes/semantic_segmentation", "image_left", "segmentation_label",
        "image_id", "validation", CITYSCAPES_19),
}


def decode_tfds_example(name: str, mapping: MaskMapping, row) -> dict:
  """Encoded image + mask -> example; a bad size or value names the example."""
  image = decode_image(row["image"])
  raw = tf.io.decode_png(row["mask"], channels=1)[..., 0]
  same_size = tf.debugging.Assert(
      tf.reduce_all(tf.equal(tf.shape(image)[:2], tf.shape(raw))),
      [f"{name}: mask size differs from image size; example",
       row["id"], "image", tf.shape(image), "mask", tf.shape(raw)])
  with tf.control_dependencies([same_size]):
    values = tf.unique(tf.reshape(tf.cast(raw, tf.int32), [-1]))[0]
  mapped = np.flatnonzero(mapping.known).tolist()
  known = tf.debugging.Assert(
      tf.reduce_all(tf.gather(tf.constant(mapping.known), values)),
      [f"{name}: a mask holds raw values that config.mask_map does not map "
       f"(it maps {mapped}); example", row["id"], "values", values],
      summarize=64)
  with tf.control_dependencies([known]):
    label = mapping.lookup(raw)
  return {"image": image, "label": label}


def download_kwargs(config: ml_collections.ConfigDict) -> dict:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  if not config.tfds_manual_dir:
    return {}
  manual_dir = str(Path(config.tfds_manual_dir).expanduser().resolve())
  return {"download_config": tfds.download.DownloadConfig(
      manual_dir=manual_dir)}


def load_tfds_split(name: str, split: str, config: ml_collections.ConfigDict,
                    mapping: MaskMapping) -> Records:
  """One split as a stream of encoded (image, mask, id), in file order."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  spec = TFDS_SEGMENTATION[name]
  keys = (spec.image_key, spec.mask_key, spec.id_key)
  decoders = tfds.decode.PartialDecoding(  # Skips head boxes, labels, ...
      {key: True for key in keys},
      decoders={spec.image_key: tfds.decode.SkipDecoding(),
                spec.mask_key: tfds.decode.SkipDecoding()})
  ds, info = tfds.load(
      spec.tfds_name, split=split, data_dir=config.tfds_data_dir,
      with_info=True, shuffle_files=False, decoders=decoders,
      download_and_prepare_kwargs=download_kwargs(config))
  num = count(ds, info, split)
  ds = ds.map(lambda ex: {"image": ex[spec.image_key],
                          "mask": ex[spec.mask_key], "id": ex[spec.id_key]})
  return Records(num=num, stream=ds, decode=functools.partial(
      decode_tfds_example, name, mapping))


def load_tfds_segmentation(name: str,
                           config: ml_collections.ConfigDict) -> SplitSource:
  spec = TFDS_SEGMENTATION[name]
  mapping = config_mapping(config, spec.default_mapping)
  train = load_tfds_split(name, config.train_split, config, mapping)
  evaluation = load_tfds_split(name, config.eval_split or spec.eval_split,
                               config, mapping)
  return SplitSource.from_records(mapping.class_names, train=train,
                                  eval=evaluation, label_kind="mask")


def _make_tfds_builder(name: str):
  def builder(config: ml_collections.ConfigDict) -> SplitSource:
    return load_tfds_segmentation(name, config)

  builder.__name__ = builder.__qualname__ = name
  builder.__doc__ = (f"TFDS `{TFDS_SEGMENTATION[name].tfds_name}` with masks, "
                     "read by `load_tfds_segmentation`.")
  return builder


for _name in TFDS_SEGMENTATION:
  register_dataset(_name)(_make_tfds_builder(_name))
