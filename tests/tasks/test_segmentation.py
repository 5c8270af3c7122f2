"""Segmentation losses and metrics on hand-made masks and known confusion matrices."""
import jax.numpy as jnp
import numpy as np
import pytest

from tlflax.tasks import segmentation as seg

torch = pytest.importorskip("torch")


def hand_made():
  """Batch of 2 images 2x3, 3 classes; 255 = ignored."""
  labels = np.array([[[0, 1, 2], [255, 1, 0]], [[2, 2, 255], [0, 0, 1]]], np.int32)
  logits = np.random.RandomState(0).randn(2, 2, 3, 3).astype(np.float32)
  return logits, labels


@pytest.mark.parametrize("weights", [None, (0.2, 1.0, 3.0)])
def test_cross_entropy_matches_torch(weights):
  logits, labels = hand_made()
  expected = torch.nn.functional.cross_entropy(
      torch.from_numpy(logits).permute(0, 3, 1, 2), torch.from_numpy(labels).long(),
      weight=None if weights is None else torch.tensor(weights), ignore_index=255)
  got = seg.cross_entropy(jnp.asarray(logits), jnp.asarray(labels), class_weights=weights)
  np.testing.assert_allclose(got, expected.item(), rtol=1e-6)


def test_cross_entropy_all_ignored_is_zero_and_bad_weights_fail():
  logits, labels = hand_made()
  assert float(seg.cross_entropy(logits, np.full_like(labels, 255))) == 0.0
  with pytest.raises(ValueError, match="one weight per class"):
    seg.cross_entropy(logits, labels, class_weights=(1.0, 2.0))


def test_dice_loss_by_hand():
  # One image, 1x2 pixels, 2 classes; probabilities chosen exactly.
  probs = np.array([[[[0.8, 0.2], [0.3, 0.7]]]], np.float32)
  labels = np.array([[[0, 255]]], np.int32)  # Second pixel ignored.
  logits = np.log(probs)
  # Valid pixel: p=(0.8, 0.2), t=(1, 0). Dice_0=(1.6+1)/(0.8+1+1), Dice_1=(0+1)/(0.2+0+1).
  expected = 1 - np.mean([(1.6 + 1) / 2.8, 1 / 1.2])
  np.testing.assert_allclose(seg.dice_loss(logits, labels), expected, rtol=1e-6)
  perfect = np.log(np.array([[[[1 - 1e-7, 1e-7]]]], np.float32))
  assert float(seg.dice_loss(perfect, np.array([[[0]]]))) < 1e-6


def test_confusion_matrix_skips_ignored_pixels_and_padded_rows():
  _, labels = hand_made()
  predicted = np.array([[[0, 2, 2], [1, 1, 0]], [[2, 0, 0], [0, 1, 1]]], np.int32)
  full = np.asarray(seg.confusion_matrix(predicted, labels, 3))
  expected = np.zeros((3, 3))
  for t, p in zip(labels.reshape(-1), predicted.reshape(-1)):
    if t != 255:
      expected[t, p] += 1
  np.testing.assert_array_equal(full, expected)
  first_only = np.asarray(seg.confusion_matrix(predicted, labels, 3,
                                               row_mask=np.array([1.0, 0.0])))
  assert first_only.sum() == 5 and first_only[2, 2] == 1


def test_iou_metrics_on_known_matrix():
  # Rows true, columns predicted. "dog" is never true but predicted 5 times: IoU 0, counted.
  confusion = np.array([[50, 10, 0], [5, 30, 5], [0, 0, 0]])
  result = seg.iou_metrics(confusion, ["bg", "cat", "dog"])
  iou_bg, iou_cat = 50 / (50 + 10 + 5), 30 / (30 + 5 + 5 + 10)
  np.testing.assert_allclose(result["scalars"]["eval/mIoU"], (iou_bg + iou_cat + 0) / 3)
  np.testing.assert_allclose(result["scalars"]["eval/pixel_accuracy"], 80 / 100)
  np.testing.assert_allclose(result["per_class"]["cat"]["Dice"], 60 / (60 + 20))
  assert result["per_class"]["dog"]["IoU"] == 0.0
  # A class absent from labels and predictions has no IoU and is left out of the mean.
  absent = seg.iou_metrics(np.array([[50, 10, 0], [5, 30, 0], [0, 0, 0]]), ["bg", "cat", "dog"])
  assert absent["per_class"]["dog"]["IoU"] is None
  np.testing.assert_allclose(absent["scalars"]["eval/mIoU"], (50 / 65 + 30 / 45) / 2)


def test_task_sums_and_metrics_end_to_end():
  logits, labels = hand_made()
  task = seg.make_task(num_classes=3, dice_weight=1.0)
  outputs = {"out": jnp.asarray(logits), "aux": jnp.asarray(logits)}
  loss = task.loss(outputs, {"label": labels})
  expected = ((1 + 0.5) * seg.cross_entropy(logits, labels) + seg.dice_loss(logits, labels))
  np.testing.assert_allclose(loss, expected, rtol=1e-6)
  sums = task.eval_sums(outputs, {"label": labels, "mask": np.array([1.0, 1.0])})
  report = task.eval_metrics({k: np.asarray(v) for k, v in sums.items()}, ["a", "b", "c"])
  assert sums["pixels"] == 10 and report["scalars"]["eval/num_examples"] == 2
  np.testing.assert_allclose(report["scalars"]["eval/loss"], seg.cross_entropy(logits, labels),
                             rtol=1e-6)
