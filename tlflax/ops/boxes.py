"""Box arithmetic for detection: IoU, GIoU loss, the two box codings, clipping, batched NMS.

Boxes are `(x1, y1, x2, y2)` in pixels of the network input (continuous
coordinates), as torchvision. Every function is jit-able with static shapes:
NMS returns a fixed number of slots with a validity mask instead of a
variable-length list. Formulas follow torchvision's (`ops/boxes.py`,
`models/detection/_utils.py`) so results match it to float rounding.
"""
from __future__ import annotations

import math
from typing import Sequence, Tuple

import jax
import jax.numpy as jnp

# torchvision's BoxCoder clamps dw, dh here so exp() stays finite (a 1000 / 16 ratio).
BBOX_XFORM_CLIP = math.log(1000.0 / 16)


def box_area(boxes):
  return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def box_iou(boxes1, boxes2):
  """Pairwise IoU [..., M, N] of boxes1 [..., M, 4] and boxes2 [..., N, 4] (torchvision's
  `box_iou`: no epsilon, so two zero-area boxes give NaN; callers mask padding rows)."""
  lt = jnp.maximum(boxes1[..., :, None, :2], boxes2[..., None, :, :2])
  rb = jnp.minimum(boxes1[..., :, None, 2:], boxes2[..., None, :, 2:])
  wh = jnp.maximum(rb - lt, 0.0)
  inter = wh[..., 0] * wh[..., 1]
  union = box_area(boxes1)[..., :, None] + box_area(boxes2)[..., None, :] - inter
  return inter / union


def giou_loss(boxes1, boxes2, eps: float = 1e-7):
  """Elementwise 1 - GIoU of matching rows [..., 4] (torchvision's `generalized_box_iou_loss`
  with reduction "none"): gradients flow even when the boxes do not overlap."""
  x1, y1, x2, y2 = jnp.moveaxis(boxes1, -1, 0)
  x1g, y1g, x2g, y2g = jnp.moveaxis(boxes2, -1, 0)
  iw = jnp.minimum(x2, x2g) - jnp.maximum(x1, x1g)
  ih = jnp.minimum(y2, y2g) - jnp.maximum(y1, y1g)
  inter = jnp.where((iw > 0) & (ih > 0), iw * ih, 0.0)
  union = (x2 - x1) * (y2 - y1) + (x2g - x1g) * (y2g - y1g) - inter
  iou = inter / (union + eps)
  hull_w = jnp.maximum(x2, x2g) - jnp.minimum(x1, x1g)
  hull = hull_w * (jnp.maximum(y2, y2g) - jnp.minimum(y1, y1g))
  return 1.0 - (iou - (hull - union) / (hull + eps))


def _centres_sizes(boxes):
  w = boxes[..., 2] - boxes[..., 0]
  h = boxes[..., 3] - boxes[..., 1]
  return boxes[..., 0] + 0.5 * w, boxes[..., 1] + 0.5 * h, w, h


def encode_deltas(anchors, boxes, weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0)):
  """(dx, dy, dw, dh) of `boxes` relative to `anchors` (torchvision's BoxCoder.encode_single):
  centre offsets in anchor widths/heights and log size ratios, times `weights`."""
  ax, ay, aw, ah = _centres_sizes(anchors)
  gx, gy, gw, gh = _centres_sizes(boxes)
  wx, wy, ww, wh = weights
  return jnp.stack([wx * (gx - ax) / aw, wy * (gy - ay) / ah,
                    ww * jnp.log(gw / aw), wh * jnp.log(gh / ah)], axis=-1)


def decode_deltas(anchors, deltas, weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
                  clip: float = BBOX_XFORM_CLIP):
  """Inverse of `encode_deltas` (BoxCoder.decode_single); dw, dh are clamped at `clip` so an
  untrained regression cannot overflow exp()."""
  ax, ay, aw, ah = _centres_sizes(anchors.astype(deltas.dtype))
  wx, wy, ww, wh = weights
  dx, dy = deltas[..., 0] / wx, deltas[..., 1] / wy
  dw = jnp.minimum(deltas[..., 2] / ww, clip)
  dh = jnp.minimum(deltas[..., 3] / wh, clip)
  cx, cy = dx * aw + ax, dy * ah + ay
  half_w, half_h = 0.5 * jnp.exp(dw) * aw, 0.5 * jnp.exp(dh) * ah
  return jnp.stack([cx - half_w, cy - half_h, cx + half_w, cy + half_h], axis=-1)


def encode_ltrb(anchors, boxes, normalize: bool = True):
  """Distances (left, top, right, bottom) from each anchor's centre to the box edges, divided
  by the anchor's width/height (torchvision's BoxLinearCoder, as FCOS: the anchor is a
  stride-sized square, so this is "distance in strides")."""
  cx = 0.5 * (anchors[..., 0] + anchors[..., 2])
  cy = 0.5 * (anchors[..., 1] + anchors[..., 3])
  ltrb = jnp.stack([cx - boxes[..., 0], cy - boxes[..., 1],
                    boxes[..., 2] - cx, boxes[..., 3] - cy], axis=-1)
  return ltrb / _ltrb_scale(anchors) if normalize else ltrb


def decode_ltrb(anchors, rel, normalize: bool = True):
  """Inverse of `encode_ltrb` (BoxLinearCoder.decode)."""
  anchors = anchors.astype(rel.dtype)
  cx = 0.5 * (anchors[..., 0] + anchors[..., 2])
  cy = 0.5 * (anchors[..., 1] + anchors[..., 3])
  if normalize:
    rel = rel * _ltrb_scale(anchors)
  return jnp.stack([cx - rel[..., 0], cy - rel[..., 1], cx + rel[..., 2], cy + rel[..., 3]],
                   axis=-1)


def _ltrb_scale(anchors):
  w = anchors[..., 2] - anchors[..., 0]
  h = anchors[..., 3] - anchors[..., 1]
  return jnp.stack([w, h, w, h], axis=-1)


def clip_boxes(boxes, size: Tuple[int, int]):
  """Clamps x to [0, width] and y to [0, height] (`size` = (height, width))."""
  height, width = size
  x = jnp.clip(boxes[..., 0::2], 0, width)
  y = jnp.clip(boxes[..., 1::2], 0, height)
  return jnp.stack([x[..., 0], y[..., 0], x[..., 1], y[..., 1]], axis=-1)


def _iou_one_to_many(box, area, boxes, areas):
  """IoU of one box with each of `boxes`, in the operation order of torchvision's NMS kernel."""
  w = jnp.maximum(jnp.minimum(box[2], boxes[:, 2]) - jnp.maximum(box[0], boxes[:, 0]), 0.0)
  h = jnp.maximum(jnp.minimum(box[3], boxes[:, 3]) - jnp.maximum(box[1], boxes[:, 1]), 0.0)
  inter = w * h
  return inter / (area + areas - inter)


def batched_nms(boxes, scores, classes, iou_threshold: float, max_output: int, valid=None):
  """Greedy per-class NMS of one image with a static output size.

  Repeatedly keeps the highest-scoring live box and kills the live boxes of
  its class whose IoU with it exceeds `iou_threshold` (strictly, as
  torchvision), until `max_output` are kept or none is alive. This is the
  same set and order as `torchvision.ops.batched_nms(...)[:max_output]`, but
  costs O(max_output x K) instead of a K x K IoU matrix: what keeps a few
  thousand candidates cheap per image. `valid` [K] marks the candidates that
  take part (e.g. above the score threshold).

  Returns (indices [max_output] int32 into the K candidates, in decreasing
  score order, -1 for empty slots; keep [max_output] bool).
  """
  boxes, scores, classes = jnp.asarray(boxes), jnp.asarray(scores), jnp.asarray(classes)
  num = scores.shape[0]
  alive = jnp.ones((num,), bool) if valid is None else valid.astype(bool)
  areas = box_area(boxes)
  positions = jnp.arange(num)

  def cond(carry):
    step, alive, _ = carry
    return (step < max_output) & jnp.any(alive)

  def body(carry):
    step, alive, kept = carry
    best = jnp.argmax(jnp.where(alive, scores, -jnp.inf))
    iou = _iou_one_to_many(boxes[best], areas[best], boxes, areas)
    killed = (iou > iou_threshold) & (classes == classes[best])
    alive = alive & ~killed & (positions != best)
    return step + 1, alive, kept.at[step].set(best.astype(jnp.int32))

  init = (jnp.int32(0), alive, jnp.full((max_output,), -1, jnp.int32))
  _, _, kept = jax.lax.while_loop(cond, body, init)
  return kept, kept >= 0
