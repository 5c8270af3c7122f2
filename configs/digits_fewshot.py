"""Few-shot and meta-transfer on scikit-learn's digits: ImageNet MobileNetV2 at 64 px.

Commands (from the repository root):
  python -m tlflax.fewshot --config configs/digits_fewshot.py --out workdirs/digits_fewshot
  python -m tlflax.episodic --config configs/digits_fewshot.py --out workdirs/digits_episodic

Classes 0-4 are the base classes (episodic training, train split only), 5-9 the
novel classes (evaluation episodes, train + eval images). Measured figures and
wall times: experiments/FEWSHOT.md.
"""
from tlflax.config import base_config
from tlflax.transfer.episodic import episodic_config


def get_config(arg=None):
  del arg
  c = base_config()
  c.model.name = "mobilenet_v2"
  c.model.pretrained = True
  c.data.name = "digits"
  c.data.image_size = 64
  c.data.train_crop = "resize"  # Digits are tiny and centred: no random crops or flips.
  c.data.eval_crop = "resize"
  c.data.flip = False
  c.episodic = episodic_config()
  return c
