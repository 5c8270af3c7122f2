"""Object detection: dense-head losses on device, COCOeval AP on the host.

The model returns dense per-location outputs (`tlflax.models.detection`); the
loss assigns the padded ground truth (classes -1 = padding) to anchors or
points inside the jitted step. Eval runs the model's post-processing (score
threshold, per-class NMS, fixed number of detections) on device, then maps
boxes back to original image pixels and scores them with pycocotools'
COCOeval against the eval split's ground truth (`tlflax.data.detection`).
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Mapping, Optional

import jax.numpy as jnp
import numpy as np

from tlflax.tasks import TASKS, Task
from tlflax.tasks import coco_eval


def make_task(kind: str, priors: Any, ground_truth: Callable[[], Mapping[str, Any]],
              score_threshold: float = 0.05, iou_threshold: float = 0.5,
              pre_nms_top_k: int = 1000, max_detections: int = 100) -> Task:
  """Detection with head `kind` ("retinanet", "fcos") over static `priors`.

  `ground_truth()` returns the eval split in COCO format (called once, lazily).
  """
  from tlflax.heads import detection as det  # pylint: disable=g-import-not-at-top
  cached_gt: Dict[str, Any] = {}

  def loss(outputs, batch):
    return det.detection_loss(kind, outputs, batch["boxes"], batch["classes"], priors)[0]

  def train_sums(outputs, batch):
    _, parts = det.detection_loss(kind, outputs, batch["boxes"], batch["classes"], priors)
    count = jnp.asarray(batch["image"].shape[0], jnp.float32)
    sums = {f"{k}_loss": v * count for k, v in parts.items() if k != "num_positive"}
    sums["num_positive"] = jnp.asarray(parts.get("num_positive", 0.0), jnp.float32)
    sums["count"] = count
    return sums

  def train_scalars(sums):
    count = float(sums["count"])
    scalars = {f"train/{k}": float(v) / count for k, v in sums.items()
               if k.endswith("_loss")}
    scalars["train/positives_per_image"] = float(sums["num_positive"]) / count
    return scalars

  def eval_sums(outputs, batch):
    del batch
    return det.postprocess(kind, outputs, priors, score_threshold=score_threshold,
                           iou_threshold=iou_threshold, pre_nms_top_k=pre_nms_top_k,
                           max_detections=max_detections)

  def eval_accumulate(acc: Optional[Dict[str, Any]], out, batch) -> Dict[str, Any]:
    acc = acc or {"detections": [], "count": 0}
    real = np.asarray(batch["mask"]) > 0
    valid = np.asarray(out["valid"], bool) & real[:, None]
    acc["detections"] += coco_eval.to_coco_detections(
        np.asarray(out["boxes"]), np.asarray(out["scores"]), np.asarray(out["classes"]), valid,
        np.asarray(batch["image_id"]), np.asarray(batch["scale"]))
    acc["count"] += int(real.sum())
    return acc

  def eval_metrics(acc, class_names: List[str]):
    if "gt" not in cached_gt:
      cached_gt["gt"] = ground_truth()
    acc = acc or {"detections": [], "count": 0}
    result = coco_eval.coco_metrics(cached_gt["gt"], acc["detections"], class_names)
    result["scalars"]["eval/num_examples"] = acc["count"]
    result["scalars"]["eval/num_detections"] = len(acc["detections"])
    return result

  return Task("detection", loss, train_sums, train_scalars, eval_sums, eval_metrics,
              main_metric="eval/AP", eval_accumulate=eval_accumulate)


@TASKS.register("detection")
def _from_config(config, *, module=None, pipe=None, **unused_context) -> Task:
  if module is None or pipe is None:
    raise ValueError("The detection task needs the model (for its anchors/points) and the "
                     "data pipeline (for the eval ground truth): tasks.make(config, "
                     "module=..., pipe=...).")
  from tlflax.data import detection as det_data  # pylint: disable=g-import-not-at-top
  from tlflax.models import detection as det_models  # pylint: disable=g-import-not-at-top
  cfg = config.detection
  return make_task(cfg.head, det_models.priors_for(module, config.data.image_size),
                   lambda: det_data.coco_ground_truth(pipe),
                   score_threshold=cfg.score_threshold, iou_threshold=cfg.iou_threshold,
                   pre_nms_top_k=cfg.pre_nms_top_k, max_detections=cfg.max_detections)
