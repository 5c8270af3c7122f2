"""The tiny digits run the end-to-end tests share (imported by test files and by config files
that tests write for `python -m tlflax.main` subprocesses; no torch, no pytest)."""
import ml_collections

from tlflax.config import base_config


def tiny_digits_config(total_steps: int = 4) -> ml_collections.ConfigDict:
  """MobileNetV2 x0.25 from scratch on digits at 32 px; eval and checkpoint every 2 steps."""
  c = base_config()
  c.model.pretrained = False
  c.model.kwargs = ml_collections.ConfigDict({"width_mult": 0.25})
  c.model.bn_mode = "train"
  c.data.name = "digits"
  c.data.image_size = 32
  c.data.train_crop = "random_resized_crop"
  c.data.crop_scale = (0.5, 1.0)
  c.data.eval_crop = "resize"
  c.batch_size = 16
  c.eval_batch_size = 128
  c.total_steps = total_steps
  c.eval_every_steps = 2
  c.checkpoint_every_steps = 2
  c.optim.lr = 0.05
  c.optim.rules = [(r"backbone/features_[0-5]/.*", "frozen"), (".*", 1.0)]
  return c


def get_config(arg=None):
  return tiny_digits_config(int(arg) if arg else 4)
