"""Detection: priors, assignment, losses and post-processing against torchvision's RetinaNet and
FCOS internals; FPN and heads with converted weights; tiny models that learn one batch."""
import logging

import jax
import numpy as np
import optax
import pytest

import tlflax
from tests.conftest import mobilenet_v2_weight_file
from tests.models.parity import relative_error
from tlflax.heads import detection as det
from tlflax.models import priors_for
from tlflax.pretrained import load, weights

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")
from torchvision.models.detection import _utils as det_utils  # noqa: E402
from torchvision.models.detection import fcos as tv_fcos  # noqa: E402
from torchvision.models.detection import retinanet as tv_retina  # noqa: E402
from torchvision.models.detection.anchor_utils import AnchorGenerator  # noqa: E402
from torchvision.models.detection.image_list import ImageList  # noqa: E402
from torchvision.ops.feature_pyramid_network import (FeaturePyramidNetwork,  # noqa: E402
                                                     LastLevelP6P7)

STRIDES = (8, 16, 32, 64, 128)


def _shapes(size):
  return [(-(-size // s), -(-size // s)) for s in STRIDES]


def _retina_priors(size=256):
  return det.RetinaNetHead(num_classes=1).priors(_shapes(size), STRIDES, (size, size))


def _fcos_priors(size=256):
  return det.FCOSHead(num_classes=1).priors(_shapes(size), STRIDES, (size, size))


def _torch_anchors(generator, size):
  images = ImageList(torch.zeros(1, 3, size, size), [(size, size)])
  maps = [torch.zeros(1, 1, h, w) for h, w in _shapes(size)]
  return generator(images, maps)[0].numpy()


@pytest.mark.parametrize("size", [256, 384])
def test_anchors_equal_torchvision_anchor_generators(size):
  retina = _retina_priors(size)
  np.testing.assert_array_equal(retina.anchors,
                                _torch_anchors(tv_retina._default_anchorgen(), size))
  assert retina.level_sizes == tuple(9 * h * w for h, w in _shapes(size))
  assert retina.anchors.shape == (sum(retina.level_sizes), 4)
  np.testing.assert_array_equal(np.unique(retina.strides), STRIDES)
  # Sizes 32..512 (x 2^(k/3), truncated, halves rounded to even) at strides 8..128.
  sides = retina.anchors[:, 2] - retina.anchors[:, 0]
  square = (sides == retina.anchors[:, 3] - retina.anchors[:, 1])
  assert sorted(set(sides[square].tolist())) == [32, 40, 50, 64, 80, 100, 128, 160, 204, 256,
                                                 322, 406, 512, 644, 812]
  fcos = _fcos_priors(size)
  generator = AnchorGenerator(tuple((s,) for s in STRIDES), ((1.0,),) * 5)
  np.testing.assert_array_equal(fcos.anchors, _torch_anchors(generator, size))
  # FCOS points sit at (x * stride, y * stride), row-major per level.
  np.testing.assert_array_equal(fcos.points[:3], [[0, 0], [8, 0], [16, 0]])
  np.testing.assert_array_equal(fcos.points[size // 8], [0, 8])
  np.testing.assert_array_equal(fcos.levels[fcos.level_sizes[0]], 1)


def _torch_conv(flat, prefix, conv):
  flat[f"{prefix}/kernel"] = conv.weight.detach().numpy().transpose(2, 3, 1, 0)
  if conv.bias is not None:
    flat[f"{prefix}/bias"] = conv.bias.detach().numpy()


def _torch_group_norm(flat, prefix, norm):
  flat[f"{prefix}/scale"] = norm.weight.detach().numpy()
  flat[f"{prefix}/bias"] = norm.bias.detach().numpy()


def _randomise(module):
  """Non-trivial weights everywhere (torchvision's init has zero biases and unit GN)."""
  with torch.no_grad():
    for p in module.parameters():
      p.add_(torch.randn_like(p) * 0.05)
  return module.eval()


def _convert_fpn(fpn):
  flat = {}
  for i, block in enumerate(fpn.inner_blocks):
    _torch_conv(flat, f"inner_{i}", block[0])
  for i, block in enumerate(fpn.layer_blocks):
    _torch_conv(flat, f"layer_{i}", block[0])
  _torch_conv(flat, "p6", fpn.extra_blocks.p6)
  _torch_conv(flat, "p7", fpn.extra_blocks.p7)
  return flat


def _convert_tower(flat, prefix, tower, step, norm_offset):
  convs = [m for m in tower if isinstance(m, torch.nn.Conv2d)]
  for i, conv in enumerate(convs):
    _torch_conv(flat, f"{prefix}/conv_{i}", conv)
    if norm_offset is not None:
      _torch_group_norm(flat, f"{prefix}/norm_{i}", tower[i * step + norm_offset])


def _params(flat):
  return {"params": load.unflatten(flat)}


@pytest.mark.parametrize("extra_from", ["p5", "c5"])
def test_fpn_matches_torchvision(extra_from):
  """FeaturePyramidNetwork + LastLevelP6P7 on C3..C5 of a 72x72 input (odd map sizes 9, 5,
  3: the nearest upsampling must pick torch's source pixels)."""
  torch.manual_seed(0)
  channels, width = (6, 10, 12), 8
  fpn = FeaturePyramidNetwork(list(channels), width, extra_blocks=LastLevelP6P7(
      width if extra_from == "p5" else channels[-1], width))
  _randomise(fpn)
  rng = np.random.RandomState(0)
  maps = [rng.randn(2, s, s, c).astype(np.float32) for s, c in zip((9, 5, 3), channels)]
  with torch.no_grad():
    want = fpn({str(i): torch.from_numpy(m.transpose(0, 3, 1, 2)) for i, m in enumerate(maps)})
  neck = det.FPN(channels=width, extra_from=extra_from)
  features = {f"stride_{s}": m for s, m in zip((8, 16, 32), maps)}
  with jax.default_matmul_precision("highest"):
    got = neck.apply(_params(_convert_fpn(fpn)), features)
  assert neck.level_strides() == STRIDES
  assert [g.shape[1:3] for g in got] == [(9, 9), (5, 5), (3, 3), (2, 2), (1, 1)]
  for g, w in zip(got, want.values()):
    assert relative_error(g, w.numpy().transpose(0, 2, 3, 1)) < 1e-5


def _pyramid(rng, width=16, batch=2, size=128):
  return [rng.randn(batch, h, w, width).astype(np.float32) for h, w in _shapes(size)]


def _torch_levels(levels):
  return [torch.from_numpy(x.transpose(0, 3, 1, 2).copy()) for x in levels]


@pytest.mark.parametrize("group_norm", [False, True])
def test_retinanet_head_matches_torchvision(group_norm):
  torch.manual_seed(0)
  norm = (lambda c: torch.nn.GroupNorm(16, c)) if group_norm else None
  reference = _randomise(tv_retina.RetinaNetHead(16, 9, 3, norm_layer=norm))
  flat = {}
  for name, sub in (("cls_tower", reference.classification_head.conv),
                    ("box_tower", reference.regression_head.conv)):
    for i, block in enumerate(sub):
      _torch_conv(flat, f"{name}/conv_{i}", block[0])
      if group_norm:
        _torch_group_norm(flat, f"{name}/norm_{i}", block[1])
  _torch_conv(flat, "cls_logits", reference.classification_head.cls_logits)
  _torch_conv(flat, "bbox_reg", reference.regression_head.bbox_reg)
  levels = _pyramid(np.random.RandomState(1), size=64)
  head = det.RetinaNetHead(num_classes=3, group_norm=group_norm)
  fresh = head.init(jax.random.key(0), levels)
  assert set(load.flatten(fresh["params"])) == set(flat)
  with jax.default_matmul_precision("highest"):
    got = head.apply(_params(flat), levels)
  with torch.no_grad():
    want = reference(_torch_levels(levels))
  assert relative_error(got["cls_logits"], want["cls_logits"].numpy()) < 1e-5
  assert relative_error(got["box_regression"], want["bbox_regression"].numpy()) < 1e-5
  # The prior-probability bias: every class starts at p = 0.01.
  np.testing.assert_allclose(fresh["params"]["cls_logits"]["bias"], -np.log(99.0), rtol=1e-6)


def test_fcos_head_matches_torchvision():
  torch.manual_seed(0)
  reference = tv_fcos.FCOSHead(32, 1, 3)  # 32 channels: GroupNorm(32) as torchvision's.
  _randomise(reference)
  flat = {}
  _convert_tower(flat, "cls_tower", reference.classification_head.conv, 3, 1)
  _convert_tower(flat, "box_tower", reference.regression_head.conv, 3, 1)
  _torch_conv(flat, "cls_logits", reference.classification_head.cls_logits)
  _torch_conv(flat, "bbox_reg", reference.regression_head.bbox_reg)
  _torch_conv(flat, "bbox_ctrness", reference.regression_head.bbox_ctrness)
  levels = _pyramid(np.random.RandomState(2), width=32, size=64)
  with jax.default_matmul_precision("highest"):
    got = det.FCOSHead(num_classes=3).apply(_params(flat), levels)
  with torch.no_grad():
    want = reference(_torch_levels(levels))
  assert relative_error(got["cls_logits"], want["cls_logits"].numpy()) < 1e-5
  assert relative_error(got["box_regression"], want["bbox_regression"].numpy()) < 1e-5
  assert relative_error(got["centerness"], want["bbox_ctrness"].numpy()[..., 0]) < 1e-5
  assert (np.asarray(got["box_regression"]) >= 0).all()


def _torch_matcher(iou, allow_low_quality=True):
  matcher = det_utils.Matcher(0.5, 0.4, allow_low_quality_matches=allow_low_quality)
  return matcher(torch.from_numpy(np.asarray(iou, np.float32))).numpy()


def test_matcher_equals_torchvision_on_hand_made_iou():
  iou = np.array([
      # anchors: 0 pos(gt0)  1 ignore  2 neg  3 low-quality best of gt1  4 pos(gt1) beats gt0
      [0.90, 0.45, 0.10, 0.00, 0.60],
      [0.10, 0.00, 0.05, 0.35, 0.70],
      [0.00, 0.00, 0.00, 0.20, 0.00],  # gt 2: best IoU 0.2 at anchor 3 (a tie handled below)
  ], np.float32)
  valid = np.array([True, True, True])
  got = det.match_iou(iou, valid)
  np.testing.assert_array_equal(got, _torch_matcher(iou))
  # Anchor 3's best gt is gt 1 (0.35 > 0.2): the low-quality match gives it gt 1.
  np.testing.assert_array_equal(got, [0, -2, -1, 1, 1])
  np.testing.assert_array_equal(det.match_iou(iou, valid, allow_low_quality_matches=False),
                                _torch_matcher(iou, False))
  np.testing.assert_array_equal(det.match_iou(iou, valid, allow_low_quality_matches=False),
                                [0, -2, -1, -1, 1])
  # A padding row never matches, even with a high IoU: as if the row were not there.
  padded = np.asarray(det.match_iou(iou, np.array([False, True, True])))
  np.testing.assert_array_equal(padded, [-1, -1, -1, 1, 1])
  without = _torch_matcher(iou[1:])
  np.testing.assert_array_equal(padded, np.where(without >= 0, without + 1, without))
  # Ties for a gt's best IoU all become matches; random matrices agree with torchvision.
  rng = np.random.RandomState(0)
  for _ in range(5):
    iou = np.round(rng.uniform(0, 0.8, (4, 30)), 1).astype(np.float32)
    np.testing.assert_array_equal(det.match_iou(iou, np.ones(4, bool)), _torch_matcher(iou))
  # No ground truth at all: every anchor is background.
  assert (np.asarray(det.match_iou(iou, np.zeros(4, bool))) == -1).all()


def test_anchor_assignment_hand_made():
  priors = _retina_priors(256)
  anchors = priors.anchors
  on_anchor = anchors[5000]  # A box exactly on an anchor: IoU 1.
  boxes = np.stack([on_anchor, [0, 0, 0, 0]]).astype(np.float32)
  matched = np.asarray(det.assign_anchors(anchors, boxes, np.array([True, False])))
  assert matched[5000] == 0
  iou = np.asarray(det.box_ops.box_iou(boxes[:1], anchors))[0]
  np.testing.assert_array_equal(matched == 0, iou >= 0.5)
  np.testing.assert_array_equal(matched == -2, (iou >= 0.4) & (iou < 0.5))
  np.testing.assert_array_equal(matched == -1, iou < 0.4)  # Far anchors: background.
  assert (matched == -1).sum() > 0.99 * len(anchors)
  # A tiny box overlaps every anchor below 0.4: only its best anchor(s) match (low quality).
  tiny = np.array([[100, 100, 104, 104]], np.float32)
  matched = np.asarray(det.assign_anchors(anchors, tiny, np.array([True])))
  iou = np.asarray(det.box_ops.box_iou(tiny, anchors))[0]
  assert iou.max() < 0.4
  np.testing.assert_array_equal(np.flatnonzero(matched == 0), np.flatnonzero(iou == iou.max()))
  assert (matched[matched != 0] == -1).all()
  # An anchor whose IoU with the box is between 0.4 and 0.5 is ignored.
  box = np.array([[0, 0, 40, 40]], np.float32)
  matched = np.asarray(det.assign_anchors(anchors, box, np.array([True])))
  iou = np.asarray(det.box_ops.box_iou(box, anchors))[0]
  assert ((iou >= 0.4) & (iou < 0.5)).any() and (matched[(iou >= 0.4) & (iou < 0.5)] == -2).all()


def test_fcos_point_assignment_hand_made():
  """A 40x40 box at (40, 40)-(80, 80) on a 256 image: its stride-8 points strictly within 1.5
  strides (12 px) of the centre (60, 60) are positive; bigger boxes go to coarser levels;
  where two boxes claim a point the smaller wins."""
  priors = _fcos_priors(256)
  anchors, levels = priors.anchors, priors.levels
  points = np.asarray(priors.points)

  def assign(boxes):
    boxes = np.asarray(boxes, np.float32)
    return np.asarray(det.assign_points(anchors, levels, boxes, np.ones(len(boxes), bool)))

  matched = assign([[40, 40, 80, 80]])
  positive = points[matched == 0]
  # Centre sampling: |p - 60| < 12 on both axes of the stride-8 grid: x, y in {56, 64}.
  assert set(map(tuple, positive.tolist())) == {(56, 56), (64, 56), (56, 64), (64, 64)}
  assert (levels[matched == 0] == 0).all()  # Max distance 24 < 64: the first level.
  # A 128x128 box centred at 120: stride-8 points reach 72 > 64 (too far for level 0); the
  # stride-16 points within 24 px, {112, 128}^2, reach 72 in (64, 128): level 1; the stride-32
  # ones within 48 px reach at most 104 < 128.
  matched = assign([[56, 56, 184, 184]])
  assert set(map(tuple, points[matched == 0].tolist())) == {(112, 112), (128, 112), (112, 128),
                                                            (128, 128)}
  assert (levels[matched == 0] == 1).all()
  # Overlapping boxes: the smaller one takes the shared points.
  matched = assign([[40, 40, 80, 80], [36, 36, 84, 84]])
  assert ((matched == 0).sum() == 4) and ((matched == 1).sum() == 0)
  # Padding rows are ignored.
  boxes = np.array([[40, 40, 80, 80], [0, 0, 0, 0]], np.float32)
  matched = np.asarray(det.assign_points(anchors, levels, boxes, np.array([False, False])))
  assert (matched == -1).all()


def test_focal_loss_matches_torchvision():
  rng = np.random.RandomState(0)
  logits = rng.randn(50, 7).astype(np.float32) * 3
  targets = (rng.rand(50, 7) < 0.2).astype(np.float32)
  want = torchvision.ops.sigmoid_focal_loss(torch.from_numpy(logits), torch.from_numpy(targets))
  np.testing.assert_allclose(det.sigmoid_focal_loss(logits, targets), want.numpy(),
                             rtol=2e-5, atol=1e-7)


def _gt():
  """Batch of 3 at 256 px, 4 padded rows: two boxes, one box, none."""
  boxes = np.zeros((3, 4, 4), np.float32)
  classes = np.full((3, 4), -1, np.int32)
  boxes[0, :2] = [[20, 30, 70, 90], [60, 50, 240, 200]]
  classes[0, :2] = [2, 0]
  boxes[1, 0] = [100, 10, 130, 150]
  classes[1, 0] = 1
  return boxes, classes


def _targets(boxes, classes):
  return [{"boxes": torch.from_numpy(b[c >= 0]), "labels": torch.from_numpy(c[c >= 0]).long()}
          for b, c in zip(boxes, classes)]


class _Backbone(torch.nn.Module):
  out_channels = 32  # Only sizes the reference's head (GroupNorm(32)); its weights are unused.


def _random_outputs(kind, n, num_classes=3, batch=3, seed=0):
  rng = np.random.RandomState(seed)
  outputs = {"cls_logits": (rng.randn(batch, n, num_classes) * 2 - 2).astype(np.float32),
             "box_regression": (rng.randn(batch, n, 4) * 0.3).astype(np.float32)}
  if kind == "fcos":
    outputs["box_regression"] = np.abs(outputs["box_regression"]) * 4
    outputs["centerness"] = rng.randn(batch, n).astype(np.float32)
  return outputs


def _torch_head_outputs(outputs):
  out = {"cls_logits": torch.from_numpy(outputs["cls_logits"]),
         "bbox_regression": torch.from_numpy(outputs["box_regression"])}
  if "centerness" in outputs:
    out["bbox_ctrness"] = torch.from_numpy(outputs["centerness"][..., None])
  return out


def _reference(kind, **kwargs):
  cls = tv_retina.RetinaNet if kind == "retinanet" else tv_fcos.FCOS
  return cls(_Backbone(), num_classes=3, **kwargs).eval()


@pytest.mark.parametrize("kind", ["retinanet", "fcos"])
def test_loss_matches_torchvision(kind):
  """Random dense outputs, two/one/no GT boxes: every loss term equals torchvision's
  RetinaNet/FCOS compute_loss on the same anchors (matching, targets and normalisation)."""
  priors = _retina_priors(256) if kind == "retinanet" else _fcos_priors(256)
  outputs = _random_outputs(kind, len(priors.anchors))
  boxes, classes = _gt()
  loss, terms = jax.jit(det.detection_loss, static_argnums=0)(kind, outputs, boxes, classes,
                                                               priors)
  anchors = [torch.from_numpy(priors.anchors)] * 3
  args = (_targets(boxes, classes), _torch_head_outputs(outputs), anchors)
  if kind == "fcos":
    args += (list(priors.level_sizes),)
  want = {k: float(v) for k, v in _reference(kind).compute_loss(*args).items()}
  names = {"cls": "classification", "box": "bbox_regression", "centerness": "bbox_ctrness"}
  for ours, theirs in names.items():
    if theirs in want:
      np.testing.assert_allclose(float(terms[ours]), want[theirs], rtol=1e-5, err_msg=ours)
  np.testing.assert_allclose(float(loss), sum(want.values()), rtol=1e-5)
  assert terms["num_positive"] > 3


@pytest.mark.parametrize("kind", ["retinanet", "fcos"])
def test_postprocess_matches_torchvision(kind):
  """Same boxes, scores and labels as torchvision's postprocess_detections (score threshold,
  per-level top-k, decoding, clipping, batched NMS, max detections)."""
  size = 128
  priors = _retina_priors(size) if kind == "retinanet" else _fcos_priors(size)
  outputs = _random_outputs(kind, len(priors.anchors), batch=2, seed=3)
  options = dict(score_threshold=0.1, iou_threshold=0.5, pre_nms_top_k=200, max_detections=50)
  got = jax.jit(lambda o: det.postprocess(kind, o, priors, **options))(outputs)
  reference = _reference(kind, score_thresh=0.1, nms_thresh=0.5, topk_candidates=200,
                         detections_per_img=50)
  sizes = list(priors.level_sizes)
  head_outputs = {k: list(v.split(sizes, dim=1)) for k, v in _torch_head_outputs(outputs).items()}
  anchors = [list(torch.from_numpy(priors.anchors).split(sizes))] * 2
  with torch.no_grad():
    want = reference.postprocess_detections(head_outputs, anchors, [(size, size)] * 2)
  for i, w in enumerate(want):
    n = len(w["scores"])
    assert 10 < n and int(got["valid"][i].sum()) == n
    np.testing.assert_allclose(got["scores"][i, :n], w["scores"].numpy(), rtol=1e-5)
    np.testing.assert_array_equal(got["classes"][i, :n], w["labels"].numpy())
    np.testing.assert_allclose(got["boxes"][i, :n], w["boxes"].numpy(), rtol=1e-5, atol=1e-3)
    assert (np.asarray(got["classes"][i, n:]) == -1).all()
    assert (np.asarray(got["scores"][i, n:]) == 0).all()


def test_priors_work_inside_jit_and_errors_name_the_problem():
  priors = _fcos_priors(128)
  outputs = _random_outputs("fcos", len(priors.anchors), batch=1)
  boxes, classes = _gt()
  loss = jax.jit(lambda o, p: det.detection_loss("fcos", o, boxes[:1], classes[:1], p)[0])
  assert np.isfinite(loss(outputs, priors))  # Priors as a traced argument.
  with pytest.raises(ValueError, match="priors_for"):
    det.detection_loss("fcos", outputs, boxes[:1], classes[:1], _fcos_priors(256))
  with pytest.raises(KeyError, match="centerness"):
    det.detection_loss("fcos", {k: outputs[k] for k in ("cls_logits", "box_regression")},
                       boxes[:1], classes[:1], priors)
  with pytest.raises(KeyError, match="Did you mean: fcos"):
    det.detection_loss("fcoss", outputs, boxes[:1], classes[:1], priors)


def _fixed_batch(size=128):
  rng = np.random.RandomState(0)
  image = rng.randn(2, size, size, 3).astype(np.float32) * 0.5
  boxes = np.zeros((2, 3, 4), np.float32)
  classes = np.full((2, 3), -1, np.int32)
  boxes[:, :2] = [[[10, 12, 50, 60], [56, 40, 120, 110]], [[30, 20, 100, 70], [4, 80, 40, 124]]]
  classes[:, :2] = [[0, 1], [1, 0]]
  for b in range(2):  # Bright boxes to find.
    for (x1, y1, x2, y2), c in zip(boxes[b, :2].astype(int), classes[b, :2]):
      image[b, y1:y2, x1:x2, c] += 2.0
  return image, boxes, classes


@pytest.mark.parametrize("kind,whole", [
    ("retinanet", False), ("fcos", False),
    pytest.param("retinanet", True, marks=pytest.mark.slow),
    pytest.param("fcos", True, marks=pytest.mark.slow)])
def test_tiny_model_learns_a_fixed_batch(kind, whole):
  """MobileNetV2 x0.25 + FPN(16) at 128 px: the dense outputs cover the priors, and Adam steps
  on one batch with two GT boxes per image cut the loss clearly. By default the backbone is
  frozen (fixed features: half the compile time); `whole` (slow) trains everything with
  BatchNorm in training mode."""
  module, variables = tlflax.create_detection_model(kind, "mobilenet_v2", num_classes=2,
                                                    fpn_channels=16, width_mult=0.25,
                                                    image_size=128, head_kwargs={"num_convs": 2})
  assert set(variables["params"]) == {"backbone", "neck", "head"}
  priors = priors_for(module, 128)
  assert priors.level_sizes == tuple((9 if kind == "retinanet" else 1) * (128 // s) ** 2
                                     for s in STRIDES)
  image, boxes, classes = _fixed_batch()
  optimizer = optax.adam(1e-3 if whole else 2e-3)
  trained_names = ("backbone", "neck", "head") if whole else ("neck", "head")
  frozen = {k: v for k, v in variables["params"].items() if k not in trained_names}

  def loss_fn(trained, batch_stats):
    model_vars = {"params": {**frozen, **trained}, "batch_stats": batch_stats}
    if whole:
      outputs, updates = module.apply(model_vars, image, train=True, mutable=["batch_stats"])
      batch_stats = updates["batch_stats"]
    else:
      outputs = module.apply(model_vars, image)
    loss, terms = det.detection_loss(kind, outputs, boxes, classes, priors)
    return loss, (terms, batch_stats, outputs)

  @jax.jit
  def step(trained, batch_stats, opt_state):
    (loss, (terms, batch_stats, outputs)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        trained, batch_stats)
    updates, opt_state = optimizer.update(grads, opt_state, trained)
    return optax.apply_updates(trained, updates), batch_stats, opt_state, loss, terms, outputs

  trained = {k: variables["params"][k] for k in trained_names}
  batch_stats, opt_state = variables["batch_stats"], optimizer.init(trained)
  losses = []
  for i in range(20 if whole else 30):
    trained, batch_stats, opt_state, loss, terms, outputs = step(trained, batch_stats, opt_state)
    losses.append(float(loss))
    if i == 0:
      n = sum(priors.level_sizes)
      assert outputs["cls_logits"].shape == (2, n, 2)
      assert outputs["box_regression"].shape == (2, n, 4)
      assert ("centerness" in outputs) == (kind == "fcos")
      assert float(terms["num_positive"]) > 4
  assert np.isfinite(losses).all()
  assert losses[-1] < 0.6 * losses[0], losses


def test_pretrained_backbone_only_is_loaded(caplog):
  path = mobilenet_v2_weight_file()
  with caplog.at_level(logging.INFO, logger="tlflax.models"):
    _, variables = tlflax.create_detection_model("fcos", "mobilenet_v2", num_classes=2,
                                                 pretrained_backbone=str(path), fpn_channels=16)
  flat = load.flatten(variables)
  converted = load.converted_file(str(path), "mobilenet_v2", "torchvision")
  backbone = [k for k in flat if k.split("/")[1] == "backbone"]
  assert backbone and all(np.array_equal(flat[k], converted[k]) for k in backbone)
  assert any(k.startswith("params/neck/") for k in flat)
  message = " ".join(r.getMessage() for r in caplog.records)
  assert "re-initialised: " in message and "head/" in message and "neck/" in message
  np.testing.assert_allclose(flat["params/head/cls_logits/bias"], -np.log(99.0), rtol=1e-6)
  assert weights.WEIGHTS.get("mobilenet_v2.tv_in1k")
