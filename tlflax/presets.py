"""Recipe presets: functions that set a config's fields from the dataset, as a paper prescribes.

Presets are called inside a config file's `get_config`, so anything given on
the command line (`--config.optim.lr=...`) is applied afterwards and wins:

  from tlflax import presets
  def get_config(arg=None):
    c = base_config(); c.data.name = "folder"; c.data.root = "..."
    return presets.bit_hyperrule(c)

BiT-HyperRule (Kolesnikov et al., "Big Transfer (BiT)", ECCV 2020, section
3.3, and its reference code): fine-tune everything with momentum SGD 0.9 at
lr 0.003 for batch 512 (scaled linearly to the configured batch), no weight
decay; resolution from the images' area (< 96 x 96 px: resize to 160 and
random-crop 128, else 512 and 480; eval resizes to the crop size); schedule
length and MixUp from the number of training examples:
  < 20k examples:  500 steps,   warmup 100, lr / 10 at 200, 300, 400; no MixUp
  < 500k:          10k steps,   warmup 500, / 10 at 3k, 6k, 9k;       MixUp 0.1
  otherwise:       20k steps,   warmup 500, / 10 at 6k, 12k, 18k;     MixUp 0.1
"""
from __future__ import annotations

import logging
from typing import Optional, Sequence, Tuple

import ml_collections
import numpy as np

log = logging.getLogger(__name__)
BIT_BASE_LR, BIT_BASE_BATCH = 0.003, 512


def bit_schedule(num_train: int) -> Tuple[int, ...]:
  """(warmup end, decay steps..., total steps) as in the BiT reference code."""
  if num_train < 20_000:
    return (100, 200, 300, 400, 500)
  if num_train < 500_000:
    return (500, 3_000, 6_000, 9_000, 10_000)
  return (500, 6_000, 12_000, 18_000, 20_000)


def bit_resolution(image_hw: Sequence[int]) -> Tuple[int, int]:
  """(pre-crop resize, crop) from the dataset's typical image height and width."""
  return (160, 128) if image_hw[0] * image_hw[1] < 96 * 96 else (512, 480)


def typical_image_hw(data_config: ml_collections.ConfigDict, num: int = 16) -> Tuple[int, int]:
  """Median height and width of the first `num` training images (decoded)."""
  from tlflax import data  # pylint: disable=g-import-not-at-top  (TensorFlow)
  source = data.build_source(data.pipeline.with_defaults(data_config))
  shapes = [tuple(ex["image"].shape[:2]) for ex in source.train.take(num).as_numpy_iterator()]
  return tuple(int(v) for v in np.median(np.asarray(shapes), axis=0))


def count_train(data_config: ml_collections.ConfigDict) -> int:
  from tlflax import data  # pylint: disable=g-import-not-at-top
  return data.build_source(data.pipeline.with_defaults(data_config)).num_train


def bit_hyperrule(config: ml_collections.ConfigDict, *, num_train: Optional[int] = None,
                  image_hw: Optional[Sequence[int]] = None) -> ml_collections.ConfigDict:
  """Sets resolution, schedule, optimizer and MixUp of `config` by BiT-HyperRule.

  `num_train` and `image_hw` are read from `config.data` when not given
  (building the dataset's source once at config time). Keeps `batch_size`
  and scales the learning rate to it.
  """
  num_train = count_train(config.data) if num_train is None else int(num_train)
  image_hw = typical_image_hw(config.data) if image_hw is None else tuple(image_hw)
  precrop, crop = bit_resolution(image_hw)
  supports = bit_schedule(num_train)
  warmup = supports[0]
  config.data.image_size = crop
  config.data.resize_size = precrop
  config.data.train_crop = "resize_random_crop"
  config.data.eval_crop = "resize"
  config.data.flip = True
  config.total_steps = supports[-1]
  config.optim.name = "momentum"
  config.optim.momentum = 0.9
  config.optim.lr = BIT_BASE_LR * config.batch_size / BIT_BASE_BATCH
  config.optim.weight_decay = 0.0
  config.optim.warmup_steps = warmup
  config.optim.schedule = "step"
  # `step` boundaries >= 1 are steps after the warmup.
  config.optim.step_boundaries = tuple(float(s - warmup) for s in supports[1:-1])
  config.optim.decay_factor = 0.1
  config.mixup.mixup_alpha = 0.0 if num_train < 20_000 else 0.1
  config.mixup.cutmix_alpha = 0.0
  config.label_smoothing = 0.0
  log.info("BiT-HyperRule: %d train images of ~%s px -> resize %d, crop %d, %d steps, "
           "lr %.3g (batch %d), MixUp %.1f", num_train, image_hw, precrop, crop,
           supports[-1], config.optim.lr, config.batch_size, config.mixup.mixup_alpha)
  return config
