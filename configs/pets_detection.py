"""Pet-head detection (Oxford-IIIT Pet head boxes) with an ImageNet MobileNetV2 backbone.

Command (from the repository root, with ../shared/data beside it):
  python -m tlflax.main --config configs/pets_detection.py --workdir workdirs/pets_det
  python -m tlflax.main --config configs/pets_detection.py:fcos --workdir workdirs/pets_fcos
  python -m tlflax.predict --workdir workdirs/pets_det --images DIR --out OUT --draw

Config argument: comma-separated head (retinanet default, fcos) and backbone (mobilenet_v2
default, efficientnet_lite0: the two whose ImageNet weights install offline).
Data: `data.root` = ../shared/data/oxford_pets_subset, Pascal VOC XML head boxes (1-based pixel
corners), two classes from the object names (cat, dog); splits/train.txt 236 images,
splits/val.txt 60. Images are resized (longer side `image_size`, aspect kept) and padded.
Eval: COCOeval on the val split in original image pixels (eval/AP, eval/AP50, ...).
Recipe: backbone stem and first stages frozen (as torchvision freezes the first layers of
detection backbones), the rest of the backbone at 0.1x; FPN and head fresh, Adam.
RetinaNet's towers have GroupNorm (torchvision's RetinaNet v2 head; FCOS always has it).
Without it (torchvision's v1 head: four N(0, 0.01) convs with no normalisation, whose output
is ~1% of their input at 128 channels) the run is bimodal: by step 290 it has either learnt
the dog class (AP50 0.98) or not (AP50 0.58-0.60, dog AP ~0.2, where it may stay to the end),
and which one depends on the seed and on rounding: one seed ends at 0.98 on one CPU and 0.62
on another. The defaults were chosen by that comparison (seeds 0, 1, 2, with and without
GroupNorm), not by a sweep over the val split.

Measured: experiments/results/pets_det_retinanet.json and pets_det_fcos.json (eval/AP, AP50,
AP75, wall time, machine, commit; `python -m tlflax.reproduce pets_det_retinanet
pets_det_fcos`, shown in README "Results").
"""
from tlflax.config import base_config, detection_config

HEADS = ("retinanet", "fcos")
BACKBONES = ("mobilenet_v2", "efficientnet_lite0")
# Stem + first inverted-residual stages (stride <= 4) of each backbone stay frozen.
FROZEN = {"mobilenet_v2": r"backbone/features_[0-3]/.*",
          "efficientnet_lite0": r"backbone/features_[0-2]/.*"}


def parse(arg):
  head, backbone = "retinanet", "mobilenet_v2"
  for part in filter(None, (arg or "").split(",")):
    if part in HEADS:
      head = part
    elif part in BACKBONES:
      backbone = part
    else:
      raise ValueError(f"Unknown config argument {part!r}; use a head {HEADS} and/or a "
                       f"backbone {BACKBONES}, comma-separated.")
  return head, backbone


def get_config(arg=None):
  head, backbone = parse(arg)
  c = base_config()
  c.task = "detection"
  c.detection = detection_config()
  c.detection.head = head
  c.detection.fpn_channels = 128
  if head == "retinanet":
    c.detection.head_kwargs.group_norm = True  # See the docstring: a stable recipe.
  c.model.name = backbone
  c.model.pretrained = True
  c.model.bn_mode = "follow_params"
  c.data.name = "voc_folder"
  c.data.root = "../shared/data/oxford_pets_subset"
  c.data.image_size = 256
  c.batch_size = 8
  c.eval_batch_size = 20
  c.num_epochs = 20
  c.optim.name = "adam"
  c.optim.lr = 1e-3
  c.optim.warmup_steps = 50
  c.optim.weight_decay = 1e-4
  c.optim.grad_clip_norm = 10.0
  c.optim.rules = [(FROZEN[backbone], "frozen"), (r"backbone/.*", 0.1), (r".*", 1.0)]
  c.log_every_steps = 10
  c.eval_every_steps = 145  # Every 5 epochs.
  return c
