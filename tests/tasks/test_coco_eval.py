"""COCOeval wrapper: perfect detections give AP 1, shifted ones less, empty ones 0."""
import numpy as np
import pytest

from tlflax.tasks import coco_eval

pytest.importorskip("pycocotools")


def ground_truth():
  images = [{"id": i, "width": 200, "height": 150} for i in range(3)]
  boxes = [(0, 0, [10, 20, 50, 40]), (0, 1, [100, 30, 60, 80]), (1, 0, [5, 5, 120, 100]),
           (2, 1, [40, 40, 30, 30])]
  annotations = [{"id": k + 1, "image_id": i, "category_id": coco_eval.category_id(c),
                  "bbox": b, "area": b[2] * b[3], "iscrowd": 0}
                 for k, (i, c, b) in enumerate(boxes)]
  categories = [{"id": coco_eval.category_id(c), "name": n} for c, n in enumerate(["cat", "dog"])]
  return {"images": images, "annotations": annotations, "categories": categories}


def detections_from(gt, shift=0.0):
  return [{"image_id": a["image_id"], "category_id": a["category_id"],
           "bbox": [a["bbox"][0] + shift * a["bbox"][2], a["bbox"][1], a["bbox"][2],
                    a["bbox"][3]], "score": 0.9} for a in gt["annotations"]]


def test_perfect_detections_score_one_and_shifted_ones_less():
  gt = ground_truth()
  perfect = coco_eval.coco_metrics(gt, detections_from(gt), ["cat", "dog"])["scalars"]
  assert perfect["eval/AP"] == pytest.approx(1.0) and perfect["eval/AP50"] == pytest.approx(1.0)
  assert perfect["eval/AP/cat"] == pytest.approx(1.0)
  shifted = coco_eval.coco_metrics(gt, detections_from(gt, shift=0.3), ["cat", "dog"])["scalars"]
  # A 30% shift: IoU 0.54 -> counts at IoU 0.5 only.
  assert shifted["eval/AP50"] == pytest.approx(1.0) and shifted["eval/AP75"] == 0.0
  assert 0.0 < shifted["eval/AP"] < 0.2


def test_no_detections_and_missing_class():
  gt = ground_truth()
  empty = coco_eval.coco_metrics(gt, [], ["cat", "dog"])["scalars"]
  assert empty["eval/AP"] == 0.0 and empty["eval/AP/dog"] == 0.0
  only_cats = dict(gt, annotations=[a for a in gt["annotations"] if a["category_id"] == 1])
  result = coco_eval.coco_metrics(only_cats, detections_from(only_cats), ["cat", "dog"])
  assert result["per_class"]["dog"]["AP"] is None and result["scalars"]["eval/AP"] == 1.0


def test_batch_detections_map_back_to_original_pixels():
  boxes = np.array([[[20, 40, 120, 120], [0, 0, 1, 1]]], np.float32)  # Network pixels.
  dets = coco_eval.to_coco_detections(boxes, np.array([[0.8, 0.1]]), np.array([[1, 0]]),
                                      np.array([[True, False]]), np.array([7]), np.array([2.0]))
  assert dets == [{"image_id": 7, "category_id": 2, "bbox": [10.0, 20.0, 50.0, 40.0],
                   "score": pytest.approx(0.8)}]
