"""The quickstart recipe (configs/quickstart.py) on EfficientNet-Lite0 instead of MobileNetV2.

The fine-tuned point beside the digits ranking (experiments/RANKING.md): the same
"last stages + head" recipe, where Lite0's last stages are features_6_* (192 ch),
features_7_0 (320 ch) and the 1x1 head conv features_8, as MobileNetV2's features_14-18.
  python -m tlflax.main --config experiments/ranking/quickstart_lite0.py \
      --workdir workdirs/rank_quickstart_lite0
"""
from tlflax.config import load_config_file


def get_config(arg=None):
  del arg
  c = load_config_file("configs/quickstart.py")
  c.model.name = "efficientnet_lite0"
  c.optim.rules = [
      (r"head/.*", 1.0),
      (r"backbone/features_(6_\d+|7_\d+|8)/.*", 1.0),
      (r"backbone/.*", "frozen"),
  ]
  return c
