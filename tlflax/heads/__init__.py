"""Task heads that read a backbone's named feature maps (segmentation decoders, detection)."""
from tlflax.heads.detection import (DETECTION_HEADS, FPN, FCOSHead, Priors, RetinaNetHead,
                                    detection_loss, postprocess)
from tlflax.heads.segmentation import (ASPP, SEGMENTATION_HEADS, DeepLabV3Head, FCNHead,
                                       UNetHead, resize_bilinear)

__all__ = ["ASPP", "DETECTION_HEADS", "FPN", "FCOSHead", "Priors", "RetinaNetHead",
           "SEGMENTATION_HEADS", "DeepLabV3Head", "FCNHead", "UNetHead", "detection_loss",
           "postprocess", "resize_bilinear"]
