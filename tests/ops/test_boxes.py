"""Box ops: codings round-trip and equal torchvision's coders; IoU/GIoU; batched NMS keeps
exactly torchvision.ops.batched_nms's boxes."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tlflax.ops import boxes as box_ops

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")
from torchvision.models.detection import _utils as det_utils  # noqa: E402


def random_boxes(rng, n, size=200.0, min_side=2.0, max_side=80.0):
  xy = rng.uniform(0, size, (n, 2))
  wh = rng.uniform(min_side, max_side, (n, 2))
  return np.concatenate([xy, xy + wh], 1).astype(np.float32)


def test_delta_coding_round_trips_and_matches_torchvision_box_coder():
  rng = np.random.RandomState(0)
  anchors, boxes = random_boxes(rng, 500), random_boxes(rng, 500)
  deltas = box_ops.encode_deltas(anchors, boxes)
  np.testing.assert_allclose(box_ops.decode_deltas(anchors, deltas), boxes, atol=2e-4)
  coder = det_utils.BoxCoder(weights=(1.0, 1.0, 1.0, 1.0))
  want = coder.encode_single(torch.from_numpy(boxes), torch.from_numpy(anchors)).numpy()
  np.testing.assert_allclose(deltas, want, rtol=1e-5, atol=1e-6)
  codes = rng.randn(500, 4).astype(np.float32) * 2  # Some dw/dh past the clamp (4.135).
  codes[:5, 2:] = 10.0
  want = coder.decode_single(torch.from_numpy(codes), torch.from_numpy(anchors)).numpy()
  np.testing.assert_allclose(box_ops.decode_deltas(anchors, codes), want, rtol=1e-5, atol=1e-3)
  # The clamp: exp(log(1000/16)) = 62.5 anchor widths at most.
  widths = np.asarray(box_ops.decode_deltas(anchors[:5], codes[:5]))
  np.testing.assert_allclose((widths[:, 2] - widths[:, 0]) / (anchors[:5, 2] - anchors[:5, 0]),
                             62.5, rtol=1e-5)
  weighted = box_ops.encode_deltas(anchors, boxes, (10.0, 10.0, 5.0, 5.0))
  np.testing.assert_allclose(box_ops.decode_deltas(anchors, weighted, (10.0, 10.0, 5.0, 5.0)),
                             boxes, atol=2e-4)


def test_ltrb_coding_round_trips_and_matches_torchvision_linear_coder():
  rng = np.random.RandomState(1)
  anchors, boxes = random_boxes(rng, 300), random_boxes(rng, 300)
  rel = box_ops.encode_ltrb(anchors, boxes)
  np.testing.assert_allclose(box_ops.decode_ltrb(anchors, rel), boxes, atol=1e-4)
  coder = det_utils.BoxLinearCoder(normalize_by_size=True)
  want = coder.encode(torch.from_numpy(anchors), torch.from_numpy(boxes)).numpy()
  np.testing.assert_allclose(rel, want, rtol=1e-6, atol=1e-6)
  # A stride-8 square at (100, 50) and a box 16 px left, 8 up, 24 right, 40 down of it.
  rel = box_ops.encode_ltrb(np.array([96, 46, 104, 54.0]), np.array([84, 42, 124, 90.0]))
  np.testing.assert_allclose(rel, [2, 1, 3, 5])


def test_iou_and_giou_match_torchvision():
  rng = np.random.RandomState(2)
  a, b = random_boxes(rng, 40), random_boxes(rng, 60)
  want = torchvision.ops.box_iou(torch.from_numpy(a), torch.from_numpy(b)).numpy()
  np.testing.assert_allclose(box_ops.box_iou(a, b), want, rtol=1e-6, atol=1e-7)
  assert (want > 0).any() and (want == 0).any()
  pairs = random_boxes(rng, 40)
  want = torchvision.ops.generalized_box_iou_loss(torch.from_numpy(a), torch.from_numpy(pairs))
  np.testing.assert_allclose(box_ops.giou_loss(a, pairs), want.numpy(), rtol=1e-5, atol=1e-6)
  # Known values: identical boxes 0; disjoint boxes 1 + (hull - union) / hull.
  np.testing.assert_allclose(box_ops.giou_loss(np.array([0, 0, 2, 2.0]), np.array([0, 0, 2, 2.0])),
                             0, atol=1e-6)
  np.testing.assert_allclose(box_ops.giou_loss(np.array([0, 0, 1, 1.0]), np.array([2, 0, 3, 1.0])),
                             1 + (3 - 2) / 3, rtol=1e-6)


def test_clip_boxes():
  clipped = box_ops.clip_boxes(jnp.array([[-5.0, 3, 70, 90], [10, -1, 20, 30]]), (80, 64))
  np.testing.assert_array_equal(clipped, [[0, 3, 64, 80], [10, 0, 20, 30]])


@pytest.mark.parametrize("seed,threshold", [(0, 0.5), (1, 0.3), (2, 0.7), (3, 0.5), (4, 0.1)])
def test_batched_nms_keeps_what_torchvision_keeps(seed, threshold):
  """Clustered random boxes in 3 classes, so plenty are suppressed; same indices, same order."""
  rng = np.random.RandomState(seed)
  centres = rng.uniform(0, 300, (15, 2))
  base = centres[rng.randint(0, 15, 400)] + rng.randn(400, 2) * 8
  wh = rng.uniform(10, 60, (400, 2))
  boxes = np.concatenate([base - wh / 2, base + wh / 2], 1).astype(np.float32)
  scores = rng.uniform(0, 1, 400).astype(np.float32)
  classes = rng.randint(0, 3, 400).astype(np.int32)
  want = torchvision.ops.batched_nms(torch.from_numpy(boxes), torch.from_numpy(scores),
                                     torch.from_numpy(classes).long(), threshold).numpy()
  assert 20 < len(want) < 400
  nms = jax.jit(box_ops.batched_nms, static_argnums=(3, 4))
  kept, keep = nms(boxes, scores, classes, threshold, 400)
  assert int(keep.sum()) == len(want)
  np.testing.assert_array_equal(np.asarray(kept)[:len(want)], want)
  assert (np.asarray(kept)[len(want):] == -1).all()
  # A static budget keeps the best ones; invalid candidates never appear.
  valid = scores > 0.3
  kept, keep = nms(boxes, scores, classes, threshold, 10, valid)
  subset = np.flatnonzero(valid)
  want = torchvision.ops.batched_nms(torch.from_numpy(boxes[subset]),
                                     torch.from_numpy(scores[subset]),
                                     torch.from_numpy(classes[subset]).long(), threshold).numpy()
  np.testing.assert_array_equal(np.asarray(kept), subset[want[:10]])
  assert bool(keep.all())


def test_batched_nms_never_suppresses_across_classes():
  box = np.array([[0, 0, 10, 10]] * 3, np.float32)
  kept, keep = box_ops.batched_nms(box, np.array([0.9, 0.8, 0.7], np.float32),
                                   np.array([0, 1, 0], np.int32), 0.5, 3)
  np.testing.assert_array_equal(kept, [0, 1, -1])
  np.testing.assert_array_equal(keep, [True, True, False])
  assert math.isclose(box_ops.BBOX_XFORM_CLIP, math.log(62.5))
