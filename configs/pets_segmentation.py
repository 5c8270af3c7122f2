"""Pet segmentation (Oxford-IIIT Pet trimaps) with an ImageNet-pretrained backbone.

Command (from the repository root, with ../shared/data beside it):
  python -m tlflax.main --config configs/pets_segmentation.py --workdir workdirs/pets_seg
  python -m tlflax.main --config configs/pets_segmentation.py:deeplabv3 --workdir workdirs/dl
  python -m tlflax.main --config configs/pets_segmentation.py:fcn,3class --workdir workdirs/x
  python -m tlflax.main --config configs/pets_segmentation.py:efficientnet_lite0 --workdir ...
  python -m tlflax.predict --workdir workdirs/pets_seg --images DIR --out OUT  # masks, overlays

Config argument: comma-separated head (unet default, deeplabv3, fcn), classes (2class
default: background / pet, the border band ignored; 3class: border as a class) and backbone
(mobilenet_v2 default, efficientnet_lite0: the two whose ImageNet weights install offline).
Data: `data.root` = ../shared/data/oxford_pets_subset (3 breeds; splits/train.txt 236 images,
splits/val.txt 60), trimap PNGs (1 pet, 2 background, 3 border). Eval resizes image and mask
to image_size x image_size, so eval/mIoU is measured at that resolution, over the config's
classes, ignored pixels excluded.
Recipe: whole network trains, backbone at 0.1x the head's learning rate (Adam), aligned
random scale (0.75-1.5x) / crop / flip at 160 px, 12 epochs; DeepLabV3 runs on the backbone
dilated to output stride 16, U-Net decodes from strides 32/16/8/4.

Measured: experiments/results/pets_seg_unet.json, pets_seg_efficientnet_lite0.json,
pets_seg_deeplabv3.json, pets_seg_fcn.json and pets_seg_deeplabv3_scratch.json (eval/mIoU,
wall time, machine, commit; `python -m tlflax.reproduce NAME`, shown in README "Results").
"""
from tlflax.config import base_config, segmentation_config
from tlflax.data import segmentation as seg_data

HEADS = ("unet", "deeplabv3", "fcn")
BACKBONES = ("mobilenet_v2", "efficientnet_lite0")
CLASSES = {"2class": seg_data.PETS_TRIMAP_2CLASS, "3class": seg_data.PETS_TRIMAP_3CLASS}


def parse(arg):
  head, classes, backbone = "unet", "2class", "mobilenet_v2"
  for part in filter(None, (arg or "").split(",")):
    if part in HEADS:
      head = part
    elif part in CLASSES:
      classes = part
    elif part in BACKBONES:
      backbone = part
    else:
      raise ValueError(f"Unknown config argument {part!r}; use a head {HEADS}, classes "
                       f"{tuple(CLASSES)} and/or a backbone {BACKBONES}, comma-separated.")
  return head, classes, backbone


def get_config(arg=None):
  head, classes, backbone = parse(arg)
  c = base_config()
  c.task = "segmentation"
  c.segmentation = segmentation_config()
  c.segmentation.head = head
  c.segmentation.output_stride = 16 if head == "deeplabv3" else None
  c.model.name = backbone
  c.model.pretrained = True
  c.model.bn_mode = "train"
  c.data.name = "mask_folder"
  c.data.root = "../shared/data/oxford_pets_subset"
  c.data.masks_dir = "trimaps"
  c.data.class_names, c.data.mask_map = CLASSES[classes]
  c.data.image_size = 160
  c.data.scale_range = (0.75, 1.5)
  c.batch_size = 8
  c.eval_batch_size = 20
  c.num_epochs = 12
  c.optim.name = "adam"
  c.optim.lr = 1e-3
  c.optim.warmup_steps = 20
  c.optim.weight_decay = 1e-4
  c.optim.rules = [(r"backbone/.*", 0.1), (r".*", 1.0)]
  c.log_every_steps = 10
  return c
