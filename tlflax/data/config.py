"""The data config: every field the builders, preprocessing and pipeline read.

One flat ConfigDict so `--config.data.<field>=...` overrides work for any
dataset; fields a dataset does not use are ignored by it. `None` placeholders
mean "the dataset's / preprocessing's own default" and still type-check
overrides.
"""
from __future__ import annotations

import ml_collections
from ml_collections import config_dict

DEFAULT_EXTENSIONS = ("jpg", "jpeg", "png", "bmp")


def default_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.name = "digits"  # Registered dataset, see `data.DATASETS.names()`.

  # Splits. eval_split None -> "val" for `folder`, `mask_folder`,
  # `voc_folder` and `coco_json`, "test" for TFDS datasets ("validation" for
  # `cityscapes`, `voc/2012` and `coco/2017`).
  c.train_split = "train"
  c.eval_split = config_dict.placeholder(str)
  c.split_seed = 0  # `digits`: seed of the fixed stratified 80/20 split.
  # > 0: eval on this seeded (class-stratified) fraction of train instead of the eval split,
  # train on the rest: the selection split of hyperparameter search (`tlflax.data.holdout`).
  c.holdout_fraction = 0.0
  c.holdout_seed = 0

  # `folder`: <root>/<train_split>/<class>/<image>, same for eval_split.
  c.root = config_dict.placeholder(str)  # Absolute or relative to the cwd.
  c.extensions = DEFAULT_EXTENSIONS  # Case-insensitive; others are skipped.
  c.verify_images = True  # Fully decode every file with PIL at build time.
  c.strict = False  # Raise on any skipped file instead of reporting it.

  # Segmentation (datasets whose label is a per-pixel class map).
  # `mask_folder`: <root>/images/<stem>.<ext>, <root>/<masks_dir>/<stem>.png,
  # <root>/splits/<split>.txt (one stem per line).
  c.masks_dir = "masks"
  # Class names, e.g. ("background", "pet"). None: the dataset's default
  # (`oxford_iiit_pet`, `cityscapes`); `mask_folder` needs it set. Detection:
  # the foreground classes in index order, e.g. ("cat", "dog"); None for
  # `voc_folder` is the sorted object names of both splits (after class_map).
  c.class_names = config_dict.placeholder(tuple)
  # ((raw mask value, class index or ignore_index), ...), e.g.
  # segmentation.PETS_TRIMAP_2CLASS[1]. None: the dataset's default; for
  # `mask_folder` the identity (raw v is class v, ignore_index stays ignored).
  c.mask_map = config_dict.placeholder(tuple)
  c.ignore_index = 255  # Label of pixels that count in no loss or metric.
  # Train-time random scale of the shorter side, as a multiple of image_size.
  c.scale_range = (0.5, 2.0)

  # Detection (label_kind "boxes": xyxy boxes and classes per image).
  # `voc_folder`: <root>/<images_dir>/<stem>.<ext>, Pascal VOC XML
  # <root>/<annotations_dir>/<stem>.xml, <root>/splits/<split>.txt.
  # `coco_json`: <root>/<images_dir>/<file_name> and the COCO instances JSON
  # <root>/<annotations>; "{split}" in images_dir and annotations becomes the
  # split name, e.g. for COCO 2017 train_split="train2017",
  # eval_split="val2017", images_dir="{split}" and the default annotations.
  c.images_dir = "images"
  c.annotations_dir = "xmls"
  c.annotations = "annotations/instances_{split}.json"
  # `voc_folder`: ((name in the XML, class name), ...) to rename or merge
  # object names, e.g. (("Cat", "cat"), ("kitten", "cat")); names it does not
  # list are kept as they are.
  c.class_map = config_dict.placeholder(tuple)
  c.max_boxes = 100  # Box rows per image in a batch (padding: class -1).
  # Boxes narrower or lower than this many pixels after resizing (and
  # cropping) are dropped from the batches.
  c.min_box_size = 1.0
  # Train-time scale jitter: a random factor on the fit-to-image_size scale.
  c.box_scale_range = (0.75, 1.25)

  # TFDS datasets (cifar10, cifar100, svhn_cropped, mnist, oxford_iiit_pet,
  # cityscapes, voc/2007, voc/2012, coco/2017).
  c.tfds_data_dir = config_dict.placeholder(str)
  # Where datasets that need a manual download (`cityscapes`: the zips
  # leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip) were put.
  # None: <tfds_data_dir>/downloads/manual.
  c.tfds_manual_dir = config_dict.placeholder(str)
  c.image_key = "image"
  c.label_key = "label"
  c.shuffle_buffer = 10_000  # Only for datasets read as streams (TFDS).

  # Preprocessing. Datasets with masks (label_kind "mask") use image_size,
  # scale_range and flip only: random scale, pad and crop to image_size for
  # training, a plain resize to image_size x image_size for eval. Datasets
  # with boxes use image_size, box_scale_range, flip, max_boxes and
  # min_box_size (see data.preprocess_boxes).
  c.image_size = 224
  c.resize_size = config_dict.placeholder(int)  # None: round(image_size/0.875).
  c.train_crop = "random_resized_crop"  # Or "resize" (tiny images).
  c.crop_scale = (0.08, 1.0)  # Area range of random_resized_crop.
  c.crop_ratio = (3 / 4, 4 / 3)  # Aspect-ratio range of random_resized_crop.
  c.flip = True  # Random horizontal flip (train only; image and mask alike).
  c.eval_crop = "center_crop"  # Or "resize".
  # Classification-only augmentations after crop and flip (train only; off by
  # default; see tlflax.data.augment). Order: rotation, RandAugment, jitter.
  c.rotation = 0.0  # Max degrees of a uniform random rotation; 0 = off.
  # torchvision ColorJitter (brightness, contrast, saturation, hue): factors
  # uniform in [max(0, 1 - x), 1 + x], hue shift in [-x, x] turns (x <= 0.5).
  c.color_jitter = (0.0, 0.0, 0.0, 0.0)
  c.color_jitter_random_order = True  # False: b, c, s, h in that order.
  # RandAugment (Cubuk et al. 2020): this many ops per image out of 14, each
  # at randaugment_magnitude in [0, 10] (10: 30 degrees rotation, ...).
  c.randaugment_layers = 0  # 0 = off; 2 is the usual choice.
  c.randaugment_magnitude = 9.0

  # Keep decoded images in memory. None: only sources already in memory
  # (`digits`), i.e. off for folders and TFDS.
  c.cache = config_dict.placeholder(bool)
  return c
