"""Datasets, preprocessing and batching for transfer learning (numpy out).

  cfg = data.default_config()
  cfg.name, cfg.root = "folder", "../shared/data/hymenoptera"
  pipe = data.build(cfg, batch_size=32, eval_batch_size=64, seed=0)
  for batch in pipe.train_batches(start_step=0): ...  # image, label
  for batch in pipe.eval_batches(): ...  # image, label, mask

Segmentation datasets (`mask_folder`, `oxford_iiit_pet`, `cityscapes`, see
`data.segmentation`) give a SplitSource with label_kind "mask": labels are
int32 [B, S, S] class maps, `config.ignore_index` where no class applies.

Detection datasets (`voc_folder`, `coco_json`, `voc/2007`, `voc/2012`,
`coco/2017`, see `data.detection`) give label_kind "boxes": batches hold
"boxes" float32 [B, M, 4] (xyxy, network-input pixels) and "classes" int32
[B, M] (-1 on padding rows); eval batches add "image_id", "scale" and
"orig_size". `data.coco_ground_truth(pipe)` is the eval split for COCOeval.

Register a dataset with `@data.register_dataset("name")` over a
`builder(config) -> SplitSource`.
"""
from tlflax.data.config import default_config
from tlflax.data.detection import coco_ground_truth
from tlflax.data.pipeline import build, IMAGENET_MEAN, IMAGENET_STD, Pipeline
from tlflax.data.registry import build_source, DATASETS, register_dataset
from tlflax.data.source import Records, SplitSource
# Importing the dataset modules registers them.
from tlflax.data import detection as _detection  # noqa: F401
from tlflax.data import digits as _digits  # noqa: F401
from tlflax.data import folder as _folder  # noqa: F401
from tlflax.data import segmentation as _segmentation  # noqa: F401
from tlflax.data import tfds_datasets as _tfds_datasets  # noqa: F401

__all__ = [
    "build", "build_source", "coco_ground_truth", "DATASETS",
    "default_config", "IMAGENET_MEAN", "IMAGENET_STD", "Pipeline", "Records",
    "register_dataset", "SplitSource",
]
