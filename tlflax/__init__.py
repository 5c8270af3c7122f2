"""tlflax: transfer learning for computer vision in JAX/Flax."""
from tlflax.models import (create_detection_model, create_model, create_segmentation_model,
                           list_models)

__all__ = ["create_detection_model", "create_model", "create_segmentation_model", "list_models"]
__version__ = "0.1.0"
