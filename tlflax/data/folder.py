"""`folder`: an image-folder dataset, <root>/<split>/<class>/<image>.

Class names are the sorted sub-folder names of the train split, so labels do
not depend on listing order. Files that are not usable images are skipped
and reported by name (or, with `strict`, raise), never left to fail inside
tf.data.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Sequence, Tuple

from absl import logging
import ml_collections
import numpy as np
import tensorflow as tf

from tlflax.data import verify
from tlflax.data.preprocess import decode_image
from tlflax.data.registry import register_dataset
from tlflax.data.source import Records, SplitSource

LAYOUT = ("The folder dataset expects <root>/<train_split>/<class>/<image> "
          "and <root>/<eval_split>/<class>/<image>, e.g. "
          "root/train/ants/1.jpg and root/val/ants/7.jpg, with the same class "
          "folders in both splits.")

Skipped = List[Tuple[str, str]]


def resolve_root(root) -> Path:
  if not root:
    raise ValueError(f"config.root is not set. {LAYOUT}")
  path = Path(root).expanduser().resolve()  # Relative paths: from the cwd.
  if not path.is_dir():
    raise FileNotFoundError(f"Dataset root {path} does not exist or is not a "
                            f"folder (config.root={root!r}). {LAYOUT}")
  return path


def split_dir(root: Path, split: str) -> Path:
  path = root / split
  if not path.is_dir():
    found = sorted(p.name for p in root.iterdir() if p.is_dir())
    raise FileNotFoundError(f"Split folder {path} does not exist (folders in "
                            f"{root}: {found}). {LAYOUT}")
  return path


def class_folders(path: Path) -> List[str]:
  return sorted(p.name for p in path.iterdir()
                if p.is_dir() and not p.name.startswith("."))


def check_classes(train_dir: Path, eval_dir: Path) -> List[str]:
  """Sorted class names; both splits must have the same class folders."""
  names = class_folders(train_dir)
  if not names:
    raise FileNotFoundError(f"No class folders in {train_dir}. {LAYOUT}")
  other = class_folders(eval_dir)
  if other != names:
    missing = sorted(set(names) - set(other))
    extra = sorted(set(other) - set(names))
    raise ValueError(
        f"Class folders differ between {train_dir} and {eval_dir}: missing "
        f"in {eval_dir.name}: {missing}, only in {eval_dir.name}: {extra}. "
        f"{LAYOUT}")
  return names


def normalise_extensions(extensions: Sequence[str]) -> frozenset:
  return frozenset("." + e.lower().lstrip(".") for e in extensions)


def list_files(split: Path, classes: Sequence[str], extensions: frozenset):
  """([(path, label)], skipped) in sorted order; wrong extensions skipped."""
  files, skipped = [], []
  for label, name in enumerate(classes):
    for path in sorted((split / name).iterdir()):
      if path.is_dir():
        skipped.append((str(path), "nested folder (not searched)"))
      elif path.suffix.lower() not in extensions:
        skipped.append((str(path), f"extension {path.suffix or '(none)'!r} "
                        f"not in config.extensions"))
      else:
        files.append((str(path), label))
  return files, skipped


def drop_broken(files, verify_images: bool):
  """Splits `files` into decodable ones and (path, reason) for the rest."""
  if not verify_images:
    return files, []
  broken: Dict[str, str] = verify.find_broken(p for p, _ in files)
  kept = [(p, label) for p, label in files if p not in broken]
  return kept, sorted(broken.items())


def report(skipped: Skipped, strict: bool) -> None:
  """Logs each skipped file by name; with `strict`, raises listing them."""
  lines = [f"  {path}: {reason}" for path, reason in skipped]
  if strict and skipped:
    raise ValueError(f"config.strict=True and {len(skipped)} file(s) are not "
                     "usable images:\n" + "\n".join(lines))
  for path, reason in skipped:
    logging.warning("folder dataset: skipping %s: %s", path, reason)
  if skipped:
    logging.warning("folder dataset: skipped %d file(s).", len(skipped))


def records(files, split: Path) -> Records:
  if not files:
    raise ValueError(f"No usable images in {split}. {LAYOUT}")
  paths = np.array([p for p, _ in files], dtype=object)
  labels = np.array([label for _, label in files], np.int32)
  return Records(num=len(files), decode=decode_file,
                 table={"path": paths, "label": labels})


def decode_file(record) -> dict:
  return {"image": decode_image(tf.io.read_file(record["path"])),
          "label": record["label"]}


@register_dataset("folder")
def folder(config: ml_collections.ConfigDict) -> SplitSource:
  root = resolve_root(config.root)
  train_dir = split_dir(root, config.train_split)
  eval_dir = split_dir(root, config.eval_split or "val")
  classes = check_classes(train_dir, eval_dir)
  extensions = normalise_extensions(config.extensions)
  splits, skipped = [], []
  for path in (train_dir, eval_dir):
    files, wrong_extension = list_files(path, classes, extensions)
    files, broken = drop_broken(files, config.verify_images)
    splits.append(files)
    skipped += wrong_extension + broken
  report(skipped, config.strict)
  return SplitSource.from_records(
      classes, train=records(splits[0], train_dir),
      eval=records(splits[1], eval_dir), skipped=skipped)
