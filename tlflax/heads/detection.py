"""Dense detection on a feature pyramid: FPN neck, RetinaNet and FCOS heads, their priors,
target assignment, losses and post-processing (score threshold, top-k, batched NMS).

Everything follows torchvision's `retinanet_resnet50_fpn` (v1) and
`fcos_resnet50_fpn` (`tests/heads/test_detection.py` checks the pieces and
the losses against them), with static shapes so a train/eval step jits once:
ground truth comes padded to a fixed M boxes (class -1 marks padding), the
assignment is a vectorised [N priors x M boxes] computation, and NMS returns
a fixed `max_detections` slots with a validity mask.

Layout of the dense outputs: levels in FPN order (stride 8 first), row-major
over each map (y, then x), then the anchors of a location; the priors
(`Priors`) list the same locations in the same order.
"""
from __future__ import annotations

import math
import re
from typing import Any, Dict, List, Sequence, Tuple

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from tlflax.heads.segmentation import feature_map
from tlflax.ops import boxes as box_ops
from tlflax.registry import Registry

DETECTION_HEADS = Registry("detection head")

# torchvision: FPN convs kaiming_uniform(a=1) (variance 1 / fan_in); head convs N(0, 0.01).
fpn_init = nn.initializers.variance_scaling(1.0, "fan_in", "uniform")
head_init = nn.initializers.normal(0.01)
PAD1 = ((1, 1), (1, 1))


@flax.struct.dataclass
class Priors:
  """The fixed locations the dense outputs refer to, for one input size.

  anchors: [N, 4] xyxy. RetinaNet: its anchors. FCOS: torchvision's
    stride-sized square around each point (the box coder's unit).
  strides: [N] the level's stride; levels: [N] level index (0 = stride 8).
  level_sizes (static): N per level, in output order.
  image_size (static): (height, width) of the network input, for clipping.
  A pytree whose arrays may be numpy constants or traced; the static fields
  stay Python, so the same object works inside and outside jit.
  """
  anchors: Any
  strides: Any
  levels: Any
  level_sizes: Tuple[int, ...] = flax.struct.field(pytree_node=False)
  image_size: Tuple[int, int] = flax.struct.field(pytree_node=False)

  @property
  def points(self):
    """[N, 2] (x, y) centres of the anchors: FCOS's points (x * stride, y * stride)."""
    return (self.anchors[:, :2] + self.anchors[:, 2:]) / 2


def cell_anchors(sizes: Sequence[float], aspect_ratios: Sequence[float]) -> np.ndarray:
  """Zero-centred anchors [len(ratios) * len(sizes), 4], ratio-major, rounded to whole pixels
  (torchvision's AnchorGenerator.generate_anchors; ratio = height / width)."""
  sizes = np.asarray(sizes, np.float32)
  h_ratios = np.sqrt(np.asarray(aspect_ratios, np.float32))
  ws = (1 / h_ratios[:, None] * sizes[None, :]).reshape(-1)
  hs = (h_ratios[:, None] * sizes[None, :]).reshape(-1)
  return np.round(np.stack([-ws, -hs, ws, hs], axis=1) / 2).astype(np.float32)


def grid_priors(level_shapes: Sequence[Tuple[int, int]], level_strides: Sequence[int],
                level_cells: Sequence[np.ndarray], image_size: Tuple[int, int]) -> Priors:
  """Every cell anchor at every location (x * stride, y * stride) of every level."""
  anchors, strides, levels = [], [], []
  for level, ((h, w), stride, cell) in enumerate(zip(level_shapes, level_strides, level_cells)):
    ys, xs = np.meshgrid(np.arange(h, dtype=np.float32) * stride,
                         np.arange(w, dtype=np.float32) * stride, indexing="ij")
    shifts = np.stack([xs, ys, xs, ys], axis=-1).reshape(-1, 1, 4)
    anchors.append((shifts + cell[None]).reshape(-1, 4))
    strides.append(np.full(len(anchors[-1]), stride, np.float32))
    levels.append(np.full(len(anchors[-1]), level, np.int32))
  return Priors(np.concatenate(anchors), np.concatenate(strides), np.concatenate(levels),
                tuple(len(a) for a in anchors), tuple(image_size))


def upsample_nearest(x, size: Tuple[int, int]):
  """torch's `F.interpolate(mode="nearest")` to `size`: source index floor(i * in / out)."""
  h, w = x.shape[1:3]
  if (h, w) == tuple(size):
    return x
  rows = np.arange(size[0]) * h // size[0]
  cols = np.arange(size[1]) * w // size[1]
  return x[:, rows][:, :, cols]


def _stride_of(name: str) -> int:
  match = re.fullmatch(r"stride_(\d+)", name)
  if not match:
    raise ValueError(f"FPN in_features must be backbone map names like 'stride_8', got {name!r}.")
  return int(match.group(1))


class FPN(nn.Module):
  """torchvision's FeaturePyramidNetwork + LastLevelP6P7.

  A 1x1 lateral conv per input map (`inner_i`), top-down pathway with nearest
  upsampling added to the laterals, a 3x3 conv per level (`layer_i`), then
  `extra_levels` stride-2 3x3 convs (`p6`, `p7`, ...; each after a ReLU of
  the previous one except the first). `extra_from="p5"` feeds the first one
  from the last FPN output, as torchvision's RetinaNet v1 and FCOS
  (`LastLevelP6P7(256, 256)`); "c5" from the last backbone map, as
  RetinaNet v2 and the paper. Returns the maps, finest first; their strides
  are `level_strides()`.
  """
  in_features: Sequence[str] = ("stride_8", "stride_16", "stride_32")
  channels: int = 256
  extra_levels: int = 2
  extra_from: str = "p5"
  dtype: Any = None

  def level_strides(self) -> Tuple[int, ...]:
    strides = [_stride_of(name) for name in self.in_features]
    return tuple(strides) + tuple(strides[-1] * 2 ** (i + 1) for i in range(self.extra_levels))

  def _conv(self, kernel: int, name: str, strides: int = 1):
    return nn.Conv(self.channels, (kernel, kernel), (strides, strides),
                   padding=PAD1 if kernel == 3 else ((0, 0), (0, 0)), kernel_init=fpn_init,
                   dtype=self.dtype, name=name)

  @nn.compact
  def __call__(self, features: Dict[str, Any], train: bool = False) -> List[Any]:
    if self.extra_from not in ("p5", "c5"):
      raise ValueError(f"FPN extra_from must be 'p5' or 'c5', got {self.extra_from!r}.")
    inputs = [feature_map(features, name, self) for name in self.in_features]
    last = self._conv(1, f"inner_{len(inputs) - 1}")(inputs[-1])
    outputs = [self._conv(3, f"layer_{len(inputs) - 1}")(last)]
    for i in range(len(inputs) - 2, -1, -1):
      lateral = self._conv(1, f"inner_{i}")(inputs[i])
      last = lateral + upsample_nearest(last, lateral.shape[1:3]).astype(lateral.dtype)
      outputs.insert(0, self._conv(3, f"layer_{i}")(last))
    x = outputs[-1] if self.extra_from == "p5" else inputs[-1]
    first_extra = int(math.log2(self.level_strides()[len(inputs) - 1])) + 1
    for i in range(self.extra_levels):
      x = self._conv(3, f"p{first_extra + i}", strides=2)(nn.relu(x) if i else x)
      outputs.append(x)
    return outputs


class ConvTower(nn.Module):
  """`num_convs` x (3x3 conv -> [GroupNorm] -> ReLU), the subnet shared over all levels.

  GroupNorm uses gcd(32, channels) groups (torchvision's 32 for 256 channels;
  tiny test widths still work). `use_bias`: torchvision's RetinaNet drops the
  conv bias when it normalises, FCOS keeps it.
  """
  num_convs: int = 4
  group_norm: bool = False
  use_bias: bool = True
  dtype: Any = None

  @nn.compact
  def __call__(self, x):
    channels = x.shape[-1]
    for i in range(self.num_convs):
      x = nn.Conv(channels, (3, 3), padding=PAD1, use_bias=self.use_bias, kernel_init=head_init,
                  dtype=self.dtype, name=f"conv_{i}")(x)
      if self.group_norm:
        x = nn.GroupNorm(num_groups=math.gcd(32, channels), epsilon=1e-5, dtype=self.dtype,
                         name=f"norm_{i}")(x)
      x = nn.relu(x)
    return x


def _output_conv(features: int, name: str, dtype, bias: float = 0.0):
  return nn.Conv(features, (3, 3), padding=PAD1, kernel_init=head_init,
                 bias_init=nn.initializers.constant(bias), dtype=dtype, name=name)


def _flatten(x, per_location: int):
  """[B, H, W, A * K] -> [B, H * W * A, K] (torchvision's view/permute/reshape order)."""
  return x.reshape(x.shape[0], -1, per_location).astype(jnp.float32)


def prior_bias(probability: float) -> float:
  """Classifier bias so every class starts at `probability` (RetinaNet's 0.01): keeps the
  first focal-loss steps from being swamped by the many easy negatives."""
  return -math.log((1 - probability) / probability)


# ----------------------------------------------------------------------------------------------
# Losses and assignment shared by the heads.

def sigmoid_focal_loss(logits, targets, alpha: float = 0.25, gamma: float = 2.0):
  """Elementwise focal loss (Lin et al. 2017; torchvision's `sigmoid_focal_loss`, no reduction).
  `alpha` < 0 turns the class balancing off."""
  p = jax.nn.sigmoid(logits)
  ce = -(targets * jax.nn.log_sigmoid(logits) + (1 - targets) * jax.nn.log_sigmoid(-logits))
  p_t = p * targets + (1 - p) * (1 - targets)
  loss = ce * (1 - p_t) ** gamma
  if alpha >= 0:
    loss = loss * (alpha * targets + (1 - alpha) * (1 - targets))
  return loss


def binary_cross_entropy_with_logits(logits, targets):
  return -(targets * jax.nn.log_sigmoid(logits) + (1 - targets) * jax.nn.log_sigmoid(-logits))


BELOW_LOW_THRESHOLD = -1  # Negative: background.
BETWEEN_THRESHOLDS = -2  # Ignored by the classification loss.


def match_iou(iou, valid, high: float = 0.5, low: float = 0.4,
              allow_low_quality_matches: bool = True):
  """torchvision's Matcher on an IoU matrix [M gt, N priors] with padded rows.

  Returns [N] int32: the matched gt index where the best IoU >= `high`, -2
  where it is in [low, high), -1 below `low`. With low-quality matches, each
  prior that ties for the best IoU of some gt is matched to its own best gt
  (as torchvision, not necessarily that gt). Rows with `valid` False are
  padding and never match. One difference: a gt whose best IoU is 0 (a
  degenerate box) adds no low-quality matches; torchvision would match every
  prior to gt 0 then.
  """
  iou = jnp.where(valid[:, None], iou, -1.0)
  best_iou = iou.max(axis=0)
  best_gt = iou.argmax(axis=0).astype(jnp.int32)
  matches = jnp.where(best_iou >= high, best_gt,
                      jnp.where(best_iou >= low, BETWEEN_THRESHOLDS, BELOW_LOW_THRESHOLD))
  if allow_low_quality_matches:
    best_per_gt = iou.max(axis=1, keepdims=True)
    ties = (iou == best_per_gt) & valid[:, None] & (best_per_gt > 0)
    matches = jnp.where(ties.any(axis=0), best_gt, matches)
  return matches.astype(jnp.int32)


def assign_anchors(anchors, boxes, valid, high: float = 0.5, low: float = 0.4,
                   allow_low_quality_matches: bool = True):
  """RetinaNet assignment of one image: `match_iou` on IoU(gt [M, 4], anchors [N, 4])."""
  return match_iou(box_ops.box_iou(boxes, anchors), valid, high, low, allow_low_quality_matches)


def assign_points(anchors, levels, boxes, valid, center_sampling_radius: float = 1.5):
  """FCOS assignment of one image (torchvision's FCOS.compute_loss): [N] gt index or -1.

  A point is a candidate for a gt when it lies inside the box, within
  `radius x stride` of the box centre (centre sampling, Chebyshev distance),
  and its largest distance to the box edges is within its level's range:
  (4 x stride, 8 x stride), open below on the first level and above on the
  last ((0, 64), (64, 128), ..., (512, inf) for strides 8..128). Among
  several candidate gts the smallest box wins.
  """
  points = (anchors[:, :2] + anchors[:, 2:]) / 2
  sizes = anchors[:, 2] - anchors[:, 0]
  centres = (boxes[:, :2] + boxes[:, 2:]) / 2
  near = jnp.abs(points[:, None] - centres[None]).max(-1) < center_sampling_radius * sizes[:, None]
  x, y = points[:, 0:1], points[:, 1:2]
  dist = jnp.stack([x - boxes[None, :, 0], y - boxes[None, :, 1],
                    boxes[None, :, 2] - x, boxes[None, :, 3] - y], axis=-1)
  lower = jnp.where(levels == 0, 0.0, sizes * 4)
  upper = jnp.where(levels == levels.max(), jnp.inf, sizes * 8)
  reach = dist.max(-1)
  candidate = (near & (dist.min(-1) > 0) & (reach > lower[:, None]) & (reach < upper[:, None])
               & valid[None, :])
  areas = jnp.where(candidate, box_ops.box_area(boxes)[None, :], jnp.inf)
  return jnp.where(candidate.any(-1), areas.argmin(-1), -1).astype(jnp.int32)


def _matched_targets(matched, boxes, classes, anchors):
  """Per-prior gt box and class; background priors get their own anchor as box (a harmless
  finite target, so masked-out losses never produce NaN gradients) and class -1."""
  foreground = matched >= 0
  index = jnp.maximum(matched, 0)
  gt_boxes = jnp.take_along_axis(boxes, index[..., None], axis=1)
  gt_classes = jnp.take_along_axis(classes, index, axis=1)
  gt_boxes = jnp.where(foreground[..., None], gt_boxes, anchors[None])
  return foreground, gt_boxes, jnp.where(foreground, gt_classes, -1)


def _check_inputs(outputs, boxes, classes, priors: Priors, needs: Sequence[str]):
  missing = [k for k in needs if k not in outputs]
  if missing:
    raise KeyError(f"Detection outputs lack {missing} (have {sorted(outputs)}): is the model's "
                   "head the kind passed to detection_loss/postprocess?")
  n = outputs["cls_logits"].shape[1]
  if n != sum(priors.level_sizes):
    raise ValueError(f"The model gives {n} locations but the priors have "
                     f"{sum(priors.level_sizes)}: make the priors with priors_for(module, "
                     "image_size) at the size of the images fed to the model.")
  if boxes is not None and (boxes.shape[:2] != classes.shape or boxes.shape[-1] != 4):
    raise ValueError(f"boxes must be [B, M, 4] and classes [B, M]; got {boxes.shape} and "
                     f"{classes.shape}.")


@DETECTION_HEADS.register("retinanet")
class RetinaNetHead(nn.Module):
  """torchvision's RetinaNetHead: classification and box subnets shared over the levels.

  Each subnet: `num_convs` 3x3 conv + ReLU (+ GroupNorm with `group_norm`,
  as torchvision's v2), then a 3x3 conv to A x classes logits (bias at the
  prior probability) or A x 4 box deltas. Anchors: A = 3 scales x 3 aspect
  ratios per location, sizes `anchor_scale x stride x scale` truncated to
  integers (32, 40, 50 at stride 8 ... 512, 645, 812 at stride 128).
  """
  OUTPUTS = ("cls_logits", "box_regression")  # What loss and postprocess read.

  num_classes: int
  num_convs: int = 4
  group_norm: bool = False
  prior_probability: float = 0.01
  anchor_scale: float = 4.0
  scales: Sequence[float] = (1.0, 2 ** (1 / 3), 2 ** (2 / 3))
  aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0)
  dtype: Any = None

  @property
  def num_anchors(self) -> int:
    return len(self.scales) * len(self.aspect_ratios)

  @nn.compact
  def __call__(self, levels: Sequence[Any], train: bool = False) -> Dict[str, Any]:
    a, c = self.num_anchors, self.num_classes
    tower = dict(num_convs=self.num_convs, group_norm=self.group_norm,
                 use_bias=not self.group_norm, dtype=self.dtype)
    cls_tower = ConvTower(**tower, name="cls_tower")
    box_tower = ConvTower(**tower, name="box_tower")
    cls_out = _output_conv(a * c, "cls_logits", self.dtype, prior_bias(self.prior_probability))
    box_out = _output_conv(a * 4, "bbox_reg", self.dtype)
    return {"cls_logits": jnp.concatenate([_flatten(cls_out(cls_tower(x)), c) for x in levels], 1),
            "box_regression": jnp.concatenate([_flatten(box_out(box_tower(x)), 4)
                                               for x in levels], 1)}

  def priors(self, level_shapes, level_strides, image_size) -> Priors:
    cells = [cell_anchors([int(self.anchor_scale * s * k) for k in self.scales],
                          self.aspect_ratios) for s in level_strides]
    return grid_priors(level_shapes, level_strides, cells, image_size)

  @staticmethod
  def loss(outputs, boxes, classes, priors: Priors, *, fg_iou_threshold: float = 0.5,
           bg_iou_threshold: float = 0.4, alpha: float = 0.25, gamma: float = 2.0,
           box_loss: str = "l1"):
    """torchvision's RetinaNet loss: focal loss over non-ignored anchors and `box_loss` over
    positives ("l1" on the (dx, dy, dw, dh) deltas, torchvision's v1 default; "smooth_l1"
    with beta 1; or "giou" on decoded boxes, v2's), each summed per image, divided by that
    image's positives (at least 1) and averaged over the batch."""
    anchors = jnp.asarray(priors.anchors)
    matched = jax.vmap(assign_anchors, (None, 0, 0, None, None))(
        anchors, boxes, classes >= 0, fg_iou_threshold, bg_iou_threshold)
    foreground, gt_boxes, gt_classes = _matched_targets(matched, boxes, classes, anchors)
    logits = outputs["cls_logits"]
    targets = jax.nn.one_hot(gt_classes, logits.shape[-1], dtype=logits.dtype)
    focal = sigmoid_focal_loss(logits, targets, alpha, gamma)
    cls = jnp.where((matched != BETWEEN_THRESHOLDS)[..., None], focal, 0.0).sum((1, 2))
    regression = outputs["box_regression"]
    if box_loss in ("l1", "smooth_l1"):
      diff = jnp.abs(regression - box_ops.encode_deltas(anchors[None], gt_boxes))
      per_anchor = (diff if box_loss == "l1" else
                    jnp.where(diff < 1.0, 0.5 * diff ** 2, diff - 0.5)).sum(-1)
    elif box_loss == "giou":
      per_anchor = box_ops.giou_loss(box_ops.decode_deltas(anchors[None], regression), gt_boxes)
    else:
      raise ValueError(f"RetinaNet box_loss must be 'l1', 'smooth_l1' or 'giou', got {box_loss!r}.")
    box = jnp.where(foreground, per_anchor, 0.0).sum(1)
    num_positive = foreground.sum(1)
    norm = jnp.maximum(num_positive, 1).astype(jnp.float32)
    terms = {"cls": jnp.mean(cls / norm), "box": jnp.mean(box / norm),
             "centerness": jnp.zeros((), jnp.float32),
             "num_positive": num_positive.sum().astype(jnp.float32)}
    return terms["cls"] + terms["box"], terms

  @staticmethod
  def scores_and_boxes(outputs, priors: Priors):
    """Per-class scores [B, N, C] (sigmoid) and decoded boxes [B, N, 4]."""
    anchors = jnp.asarray(priors.anchors)[None]
    return (jax.nn.sigmoid(outputs["cls_logits"]),
            box_ops.decode_deltas(anchors, outputs["box_regression"]))


@DETECTION_HEADS.register("fcos")
class FCOSHead(nn.Module):
  """torchvision's FCOSHead: a classification tower and a shared box/centre-ness tower.

  Each tower: `num_convs` x (3x3 conv with bias + GroupNorm + ReLU), shared
  over the levels. Box regression is ReLU'd (left, top, right, bottom)
  distances in units of the level's stride (torchvision's BoxLinearCoder
  normalised by the stride-sized anchor), which plays the part of the
  paper's per-level learnable scale (torchvision has none, nor does this).
  """
  OUTPUTS = ("cls_logits", "box_regression", "centerness")

  num_classes: int
  num_convs: int = 4
  prior_probability: float = 0.01
  dtype: Any = None

  @nn.compact
  def __call__(self, levels: Sequence[Any], train: bool = False) -> Dict[str, Any]:
    tower = dict(num_convs=self.num_convs, group_norm=True, use_bias=True, dtype=self.dtype)
    cls_tower = ConvTower(**tower, name="cls_tower")
    box_tower = ConvTower(**tower, name="box_tower")
    cls_out = _output_conv(self.num_classes, "cls_logits", self.dtype,
                           prior_bias(self.prior_probability))
    box_out = _output_conv(4, "bbox_reg", self.dtype)
    ctr_out = _output_conv(1, "bbox_ctrness", self.dtype)
    cls, box, ctr = [], [], []
    for x in levels:
      cls.append(_flatten(cls_out(cls_tower(x)), self.num_classes))
      features = box_tower(x)
      box.append(_flatten(nn.relu(box_out(features)), 4))
      ctr.append(_flatten(ctr_out(features), 1)[..., 0])
    return {"cls_logits": jnp.concatenate(cls, 1), "box_regression": jnp.concatenate(box, 1),
            "centerness": jnp.concatenate(ctr, 1)}

  def priors(self, level_shapes, level_strides, image_size) -> Priors:
    cells = [cell_anchors([s], [1.0]) for s in level_strides]
    return grid_priors(level_shapes, level_strides, cells, image_size)

  @staticmethod
  def loss(outputs, boxes, classes, priors: Priors, *, center_sampling_radius: float = 1.5,
           alpha: float = 0.25, gamma: float = 2.0):
    """torchvision's FCOS loss: focal loss over all points, GIoU loss of the decoded boxes and
    centre-ness BCE over positives, each summed over the batch and divided by the batch's
    positives (at least 1)."""
    anchors = jnp.asarray(priors.anchors)
    matched = jax.vmap(assign_points, (None, None, 0, 0, None))(
        anchors, jnp.asarray(priors.levels), boxes, classes >= 0, center_sampling_radius)
    foreground, gt_boxes, gt_classes = _matched_targets(matched, boxes, classes, anchors)
    logits = outputs["cls_logits"]
    targets = jax.nn.one_hot(gt_classes, logits.shape[-1], dtype=logits.dtype)
    cls = sigmoid_focal_loss(logits, targets, alpha, gamma).sum()
    predicted = box_ops.decode_ltrb(anchors[None], outputs["box_regression"])
    box = jnp.where(foreground, box_ops.giou_loss(predicted, gt_boxes), 0.0).sum()
    ltrb = box_ops.encode_ltrb(anchors[None], gt_boxes)
    lr, tb = ltrb[..., 0::2], ltrb[..., 1::2]
    ctr_target = jnp.sqrt(lr.min(-1) / lr.max(-1) * (tb.min(-1) / tb.max(-1)))
    ctr = binary_cross_entropy_with_logits(outputs["centerness"], ctr_target)
    ctr = jnp.where(foreground, ctr, 0.0).sum()
    num_positive = foreground.sum().astype(jnp.float32)
    norm = jnp.maximum(num_positive, 1.0)
    terms = {"cls": cls / norm, "box": box / norm, "centerness": ctr / norm,
             "num_positive": num_positive}
    return terms["cls"] + terms["box"] + terms["centerness"], terms

  @staticmethod
  def scores_and_boxes(outputs, priors: Priors):
    """Scores sqrt(sigmoid(class) x sigmoid(centre-ness)) [B, N, C] and boxes [B, N, 4]."""
    anchors = jnp.asarray(priors.anchors)[None]
    scores = jnp.sqrt(jax.nn.sigmoid(outputs["cls_logits"])
                      * jax.nn.sigmoid(outputs["centerness"])[..., None])
    return scores, box_ops.decode_ltrb(anchors, outputs["box_regression"])


def detection_loss(kind: str, outputs: Dict[str, Any], boxes, classes, priors: Priors,
                   **options) -> Tuple[Any, Dict[str, Any]]:
  """The training loss of head `kind` ("retinanet" or "fcos").

  outputs: the model's dense dict; boxes [B, M, 4] xyxy input pixels;
  classes [B, M] int (0..C-1, -1 = padding row); priors: `priors_for`.
  Returns (scalar loss, {"cls", "box", "centerness" (0 for RetinaNet),
  "num_positive" (summed over the batch)}). `options` go to the head's
  `loss` (thresholds, focal alpha/gamma, RetinaNet's `box_loss`).
  """
  head = DETECTION_HEADS.get(kind)
  _check_inputs(outputs, boxes, classes, priors, head.OUTPUTS)
  return head.loss(outputs, boxes, jnp.asarray(classes).astype(jnp.int32), priors, **options)


def top_candidates(scores, level_sizes: Sequence[int], k: int):
  """The `k` best (location, class) pairs of each level (fewer on small levels), as
  torchvision's per-level `topk_candidates`: (scores [B, K], location [B, K], class [B, K])."""
  num_classes = scores.shape[-1]
  values, locations, labels = [], [], []
  start = 0
  for size in level_sizes:
    flat = scores[:, start:start + size].reshape(scores.shape[0], -1)
    top, index = jax.lax.top_k(flat, min(k, flat.shape[1]))
    values.append(top)
    locations.append(start + index // num_classes)
    labels.append(index % num_classes)
    start += size
  return (jnp.concatenate(values, 1), jnp.concatenate(locations, 1).astype(jnp.int32),
          jnp.concatenate(labels, 1).astype(jnp.int32))


def postprocess(kind: str, outputs: Dict[str, Any], priors: Priors, *,
                score_threshold: float = 0.05, iou_threshold: float = 0.5,
                pre_nms_top_k: int = 1000, max_detections: int = 100) -> Dict[str, Any]:
  """Dense outputs -> at most `max_detections` boxes per image (torchvision's
  postprocess_detections): scores above `score_threshold`, the `pre_nms_top_k` best per level,
  boxes decoded and clipped to the input image, per-class NMS at `iou_threshold`.

  Returns {"boxes": [B, D, 4] xyxy input pixels, "scores": [B, D], "classes":
  [B, D] int32, "valid": [B, D] bool} with D = `max_detections`, sorted by
  decreasing score; empty slots have valid False, zero box and score, class -1.
  """
  head = DETECTION_HEADS.get(kind)
  _check_inputs(outputs, None, None, priors, head.OUTPUTS)
  scores, boxes = head.scores_and_boxes(outputs, priors)
  boxes = box_ops.clip_boxes(boxes, priors.image_size)
  cand_scores, cand_locations, cand_classes = top_candidates(scores, priors.level_sizes,
                                                             pre_nms_top_k)
  cand_boxes = jnp.take_along_axis(boxes, cand_locations[..., None], axis=1)
  nms = lambda b, s, c, v: box_ops.batched_nms(b, s, c, iou_threshold, max_detections, v)
  kept, valid = jax.vmap(nms)(cand_boxes, cand_scores, cand_classes,
                              cand_scores > score_threshold)
  index = jnp.maximum(kept, 0)
  take = lambda x: jnp.take_along_axis(x, index, axis=1)
  return {"boxes": jnp.where(valid[..., None], jnp.take_along_axis(
              cand_boxes, index[..., None], axis=1), 0.0),
          "scores": jnp.where(valid, take(cand_scores), 0.0),
          "classes": jnp.where(valid, take(cand_classes), -1).astype(jnp.int32),
          "valid": valid}
