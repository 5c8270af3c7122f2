"""Task heads that read a backbone's named feature maps (segmentation decoders)."""
from tlflax.heads.segmentation import (ASPP, SEGMENTATION_HEADS, DeepLabV3Head, FCNHead,
                                       UNetHead, resize_bilinear)

__all__ = ["ASPP", "SEGMENTATION_HEADS", "DeepLabV3Head", "FCNHead", "UNetHead",
           "resize_bilinear"]
