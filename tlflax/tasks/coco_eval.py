"""COCO-style box AP through pycocotools' `COCOeval` (never a hand-written mAP).

Ground truth and detections are plain COCO dicts in original-image pixels:
categories use ids `k + 1` for class index k (COCO ids start at 1), boxes are
[x, y, w, h]. The figures are COCOeval's own, on its 0-1 scale.
"""
from __future__ import annotations

import contextlib
import io
import logging
from typing import Any, Dict, List, Mapping, Sequence

import numpy as np

log = logging.getLogger(__name__)
STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def category_id(class_index: int) -> int:
  return int(class_index) + 1


def coco_metrics(ground_truth: Mapping[str, Any], detections: Sequence[Mapping[str, Any]],
                 class_names: Sequence[str]) -> Dict[str, Any]:
  """`eval/AP` ... `eval/APl` and `eval/AP/<class>` from COCOeval, plus the printed summary.

  With no detections at all every AP is 0 (COCOeval cannot load an empty result).
  `eval/APs` / `APm` / `APl` are -1, as COCOeval reports them, when the ground truth has
  no box of that size (pets heads are never "small").
  Classes without ground-truth boxes have no AP (-1 in COCOeval) and are reported as None.
  """
  from pycocotools.coco import COCO  # pylint: disable=g-import-not-at-top
  from pycocotools.cocoeval import COCOeval  # pylint: disable=g-import-not-at-top
  if not detections:
    scalars = {f"eval/{name}": 0.0 for name in STAT_NAMES}
    scalars.update({f"eval/AP/{c}": 0.0 for c in class_names})
    return {"scalars": scalars, "per_class": {c: {"AP": 0.0} for c in class_names},
            "summary": "no detections"}
  quiet = io.StringIO()
  with contextlib.redirect_stdout(quiet):
    coco_gt = COCO()
    coco_gt.dataset = {k: list(v) for k, v in ground_truth.items()}
    coco_gt.createIndex()
    coco_dt = coco_gt.loadRes([dict(d) for d in detections])
    evaluator = COCOeval(coco_gt, coco_dt, iouType="bbox")
    evaluator.evaluate()
    evaluator.accumulate()
  summary = io.StringIO()
  with contextlib.redirect_stdout(summary):
    evaluator.summarize()
  # As COCOeval prints them: -1 where no ground-truth box falls in that area range.
  scalars = {f"eval/{name}": float(v) for name, v in zip(STAT_NAMES, evaluator.stats)}
  per_class = {}
  for index, name in enumerate(class_names):
    ap = per_class_ap(evaluator, category_id(index))
    per_class[name] = {"AP": ap}
    scalars[f"eval/AP/{name}"] = 0.0 if ap is None else ap
  return {"scalars": scalars, "per_class": per_class, "summary": summary.getvalue()}


def per_class_ap(evaluator, category: int):
  """AP@[.5:.95] of one category (all areas, 100 detections) from COCOeval's precision table."""
  category_ids = list(evaluator.params.catIds)
  if category not in category_ids:
    return None
  # precision: [IoU thresholds, recall points, categories, area ranges, max detections].
  precision = evaluator.eval["precision"][:, :, category_ids.index(category), 0, -1]
  valid = precision[precision > -1]
  return float(valid.mean()) if valid.size else None


def to_coco_detections(boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray,
                       valid: np.ndarray, image_ids: np.ndarray, scales: np.ndarray,
                       ) -> List[Dict[str, Any]]:
  """Network-input xyxy boxes of a batch -> COCO result dicts in original pixels."""
  results = []
  for b in range(boxes.shape[0]):
    keep = np.asarray(valid[b], bool)
    original = np.asarray(boxes[b][keep], np.float64) / float(scales[b])
    for (x1, y1, x2, y2), score, cls in zip(original, scores[b][keep], classes[b][keep]):
      results.append({"image_id": int(image_ids[b]), "category_id": category_id(cls),
                      "bbox": [float(x1), float(y1), float(x2 - x1), float(y2 - y1)],
                      "score": float(score)})
  return results
