"""Segmentation models: torchvision parity (FCN, DeepLabV3 + aux), dilation, U-Net, pretrained
backbones."""
import logging

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tlflax
from tests.conftest import mobilenet_v2_weight_file
from tests.models.parity import randomise_bn, relative_error, to_nchw
from tlflax.heads import FCNHead, resize_bilinear
from tlflax.models import segmentation
from tlflax.models.spec import ModelSpec
from tlflax.pretrained import load, weights

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")
from torchvision.models import segmentation as tv_seg  # noqa: E402
from torchvision.models._utils import IntermediateLayerGetter  # noqa: E402
from torchvision.models.resnet import Bottleneck, ResNet  # noqa: E402


def _backbone_apply(module, variables, x):
  backbone_vars = {k: v["backbone"] for k, v in variables.items() if "backbone" in v}
  return jax.jit(module.backbone.apply)(backbone_vars, x)


def _check_torchvision_parity(reference, head, x, folder, tol=1e-4, **backbone_kwargs):
  """Saves `reference` (a torchvision segmentation model, aux head included) as a .pth,
  converts the file as a downloaded one would be, and compares "out" and "aux"
  (norm-wise relative error, highest matmul precision)."""
  randomise_bn(reference)
  path = folder / f"{head}_resnet50_random.pth"
  torch.save(reference.state_dict(), path)
  with torch.no_grad():
    expected = {k: v.numpy().transpose(0, 2, 3, 1) for k, v in reference(to_nchw(x)).items()}
  module, variables = tlflax.create_segmentation_model(
      head, "resnet50", num_classes=3, output_stride=8, aux=True, **backbone_kwargs)
  flat = load.converted_file(str(path), f"{head}_resnet50", "torchvision")
  variables, report = load.merge(variables, flat)
  assert not report["reinitialised"] and not report["unused"], report
  with jax.default_matmul_precision("highest"):
    outputs = jax.jit(module.apply)(variables, x)
  assert set(outputs) == set(expected) == {"out", "aux"}
  errors = {}
  for key, want in expected.items():
    assert outputs[key].shape == want.shape and outputs[key].dtype == jnp.float32, key
    errors[key] = relative_error(outputs[key], want)
  assert max(errors.values()) < tol, errors
  return errors


@pytest.mark.parametrize("head", ["fcn", "deeplabv3"])
def test_matches_torchvision_models(head, tmp_path):
  """torchvision's own FCN / DeepLabV3 classes and heads on its dilated ResNet-50 layout,
  one bottleneck per stage to keep the test fast (the full models: the slow test below).
  65x77 input: odd sizes and non-integer upsampling factors."""
  torch.manual_seed(0)
  backbone = IntermediateLayerGetter(
      ResNet(Bottleneck, [1, 1, 1, 1], replace_stride_with_dilation=[False, True, True]),
      {"layer4": "out", "layer3": "aux"})
  if head == "fcn":
    reference = tv_seg.FCN(backbone, tv_seg.fcn.FCNHead(2048, 3), tv_seg.fcn.FCNHead(1024, 3))
  else:
    reference = tv_seg.DeepLabV3(backbone, tv_seg.deeplabv3.DeepLabHead(2048, 3),
                                 tv_seg.fcn.FCNHead(1024, 3))
  x = np.random.RandomState(0).randn(2, 65, 77, 3).astype(np.float32)
  _check_torchvision_parity(reference, head, x, tmp_path, layers=(1, 1, 1, 1))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["fcn_resnet50", "deeplabv3_resnet50"])
def test_full_torchvision_models_match(name, tmp_path):
  torch.manual_seed(0)
  reference = getattr(tv_seg, name)(weights=None, weights_backbone=None, num_classes=3,
                                    aux_loss=True)
  x = np.random.RandomState(0).randn(1, 65, 77, 3).astype(np.float32)
  _check_torchvision_parity(reference, name.split("_")[0], x, tmp_path)


def test_bilinear_resize_matches_torch_interpolate():
  """jax.image.resize "bilinear" without antialiasing is F.interpolate(align_corners=False),
  up and down, integer and non-integer factors."""
  x = np.random.RandomState(0).randn(2, 5, 7, 3).astype(np.float32)
  for size in [(13, 19), (40, 56), (3, 4), (5, 14)]:
    want = torch.nn.functional.interpolate(to_nchw(x), size=size, mode="bilinear",
                                           align_corners=False).numpy().transpose(0, 2, 3, 1)
    np.testing.assert_allclose(resize_bilinear(jnp.asarray(x), size), want, atol=1e-6)


def _random_variables(module, seed=0):
  """Random variables of `module`'s shapes without compiling its init (the slow part of
  a test on 2 cores): kernels N(0, 1/fan_in), BatchNorm terms as `randomise_bn`."""
  init = lambda key, x: module.init(key, x, train=False)
  shapes = load.flatten(jax.eval_shape(init, jax.random.key(0), jnp.zeros((1, 32, 32, 3))))
  rng = np.random.RandomState(seed)
  ranges = {"scale": (0.5, 1.5), "bias": (-0.2, 0.2), "mean": (-0.5, 0.5), "var": (0.5, 2.0)}
  flat = {}
  for key, shape in shapes.items():
    leaf = key.rsplit("/", 1)[1]
    if leaf == "kernel":
      value = rng.randn(*shape.shape) / np.sqrt(np.prod(shape.shape[:-1]))
    else:
      value = rng.uniform(*ranges[leaf], size=shape.shape)
    flat[key] = value.astype(np.float32)
  return load.unflatten(flat)


@pytest.mark.parametrize("name,dilated,kwargs,sizes", [
    ("resnet18", dict(replace_stride_with_dilation=(False, True, True)), dict(base_channels=8),
     {"stride_4": 16, "stride_8": 8, "stride_16": 8, "stride_32": 8}),
    ("resnet18", dict(replace_stride_with_dilation=(False, False, True)), dict(base_channels=8),
     {"stride_4": 16, "stride_8": 8, "stride_16": 4, "stride_32": 4}),
    ("mobilenet_v2", dict(output_stride=8), dict(width_mult=0.25),
     {"stride_4": 16, "stride_8": 8, "stride_16": 8, "stride_32": 8}),
])
def test_dilation_keeps_size_and_is_the_strided_network_densely(name, dilated, kwargs, sizes):
  """Same weights, stride replaced by dilation: the maps keep the output-stride size, and
  sampled every (nominal / actual stride) pixels they equal the undilated network's maps
  exactly (this pins the torchvision rule: the block whose stride goes keeps the previous
  dilation, the convs after it get the new one)."""
  x = np.random.RandomState(0).randn(2, 64, 64, 3).astype(np.float32)
  factory = tlflax.models.MODELS.get(name).backbone
  strided_module, dilated_module = factory(**kwargs), factory(**kwargs, **dilated)
  variables = _random_variables(strided_module)
  assert jax.tree.map(np.shape, _random_variables(dilated_module)) == jax.tree.map(
      np.shape, variables)
  with jax.default_matmul_precision("highest"):
    strided = jax.jit(strided_module.apply)(variables, x)
    dense = jax.jit(dilated_module.apply)(variables, x)
  assert {k: v.shape[1] for k, v in dense.items()} == sizes
  for key, value in dense.items():
    step = value.shape[1] // strided[key].shape[1]
    assert relative_error(value[:, ::step, ::step], strided[key]) < 1e-5, key


def test_unet_on_tiny_mobilenet_v2():
  """The decoder ends at stride 4 (13x17 for 50x66); "out" is its logits bilinearly
  upsampled to the input size, float32, with no "aux" entry."""
  backbone = tlflax.models.MODELS.get("mobilenet_v2").backbone(width_mult=0.25)
  module = segmentation.build_segmentation_model(
      "unet", backbone, num_classes=4, head_kwargs=dict(decoder_channels=(32, 16, 8)))
  variables = _random_variables(module)
  assert variables["params"]["head"]["up_0"]["conv1"]["conv"]["kernel"].shape == (
      3, 3, 1280 + 24, 32)  # stride_32 (the 1280-wide last conv) + stride_16 skip
  x = np.random.RandomState(0).randn(2, 50, 66, 3).astype(np.float32)
  with jax.default_matmul_precision("highest"):
    outputs, captured = jax.jit(lambda v, x: module.apply(
        v, x, capture_intermediates=lambda m, _: m.name == "head"))(variables, x)
  head_logits = captured["intermediates"]["head"]["__call__"][0]
  assert head_logits.shape == (2, 13, 17, 4)
  assert set(outputs) == {"out"} and outputs["out"].shape == (2, 50, 66, 4)
  assert outputs["out"].dtype == jnp.float32 and float(jnp.std(outputs["out"])) > 0.1
  np.testing.assert_allclose(outputs["out"], resize_bilinear(head_logits, (50, 66)), atol=1e-5)


def test_training_updates_statistics_outside_frozen_bn_and_reaches_every_layer():
  """On a tiny ResNet: frozen_bn patterns reach the decoder's BatchNorm; a train step
  updates the other statistics (backbone, decoder, aux head) and every parameter gets a
  gradient, through both heads."""
  module, variables = tlflax.create_segmentation_model(
      "unet", "resnet18", num_classes=4, aux=True, base_channels=8, layers=(1, 1, 1, 1),
      frozen_bn=(r"head/up_0/.*",), head_kwargs=dict(decoder_channels=(16, 8, 8)))
  x = np.random.RandomState(0).randn(2, 48, 40, 3).astype(np.float32)

  @jax.jit
  def train_step(params):
    def loss(params):
      out, state = module.apply({**variables, "params": params}, x, train=True,
                                rngs={"dropout": jax.random.key(0)}, mutable=["batch_stats"])
      assert out["out"].shape == out["aux"].shape == (2, 48, 40, 4)
      return jnp.mean(out["out"] ** 2) + jnp.mean(out["aux"] ** 2), state
    return jax.grad(loss, has_aux=True)(params)

  grads, state = train_step(variables["params"])
  stats, new_stats = variables["batch_stats"], state["batch_stats"]
  np.testing.assert_array_equal(new_stats["head"]["up_0"]["conv1"]["bn"]["mean"],
                                stats["head"]["up_0"]["conv1"]["bn"]["mean"])
  for path in [("head", "up_1", "conv1"), ("head", "up_2", "conv2"), ("backbone", "conv1"),
               ("aux_head", "conv")]:
    old, new = stats, new_stats
    for p in path:
      old, new = old[p], new[p]
    assert not np.allclose(old["bn"]["mean"], new["bn"]["mean"]), path
  norms = {"/".join(p.key for p in path): float(jnp.linalg.norm(g))
           for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]}
  assert min(norms.values()) > 0, [k for k, v in norms.items() if v == 0]


def test_pretrained_backbone_loads_only_the_backbone(caplog):
  """Real ImageNet MobileNetV2: every backbone tensor comes from the checkpoint; the
  decoder and aux head are fresh and reported; the classifier's head is not used."""
  mobilenet_v2_weight_file()
  with caplog.at_level(logging.INFO):
    module, variables = tlflax.create_segmentation_model(
        "fcn", "mobilenet_v2", num_classes=2, pretrained_backbone=True, output_stride=16,
        aux=True)
  flat = load.flatten(variables)
  checkpoint = load.converted_weight(weights.WEIGHTS.get("mobilenet_v2.tv_in1k"))
  backbone_keys = [k for k in flat if "/backbone/" in f"/{k}"]
  assert len(backbone_keys) == sum(1 for k in checkpoint if "/backbone/" in k) > 200
  for key in backbone_keys:
    np.testing.assert_array_equal(flat[key], checkpoint[key], err_msg=key)
  assert flat["params/head/classifier/kernel"].shape == (1, 1, 320, 2)
  assert flat["params/aux_head/classifier/kernel"].shape == (1, 1, 24, 2)
  log = caplog.text
  assert "head/classifier (2 tensors)" in log and "aux_head/conv (5 tensors)" in log
  assert "backbone/features_0" not in log.split("re-initialised:")[-1]
  assert module.backbone.output_stride == 16


def test_merge_only_the_backbone_of_a_classifier_checkpoint():
  variables = {"params": {"backbone": {"conv": {"kernel": np.zeros((3, 3, 3, 8), np.float32)}},
                          "head": {"classifier": {"kernel": np.zeros((1, 1, 8, 2), np.float32)}}},
               "batch_stats": {"backbone": {"bn": {"mean": np.zeros(8, np.float32)}}}}
  checkpoint = {"params/backbone/conv/kernel": np.ones((3, 3, 3, 8), np.float32),
                "batch_stats/backbone/bn/mean": np.ones(8, np.float32),
                "params/head/kernel": np.ones((8, 1000), np.float32)}
  merged, report = load.merge(variables, checkpoint, only=segmentation.BACKBONE_VARIABLES)
  assert sorted(report["loaded"]) == ["batch_stats/backbone/bn/mean",
                                      "params/backbone/conv/kernel"]
  assert report["reinitialised"] == ["params/head/classifier/kernel"]
  assert report["unused"] == ["params/head/kernel"]
  np.testing.assert_array_equal(merged["params"]["backbone"]["conv"]["kernel"], 1.0)
  np.testing.assert_array_equal(merged["params"]["head"]["classifier"]["kernel"], 0.0)
  # Inside `only` the merge stays strict.
  with pytest.raises(load.PretrainedMismatchError, match="missing in checkpoint: batch_stats"):
    load.merge(variables, {"params/backbone/conv/kernel": checkpoint[
        "params/backbone/conv/kernel"]}, only=segmentation.BACKBONE_VARIABLES)


def test_output_stride_needs_a_dilatable_backbone():
  plain = ModelSpec(backbone=lambda **kw: None, stages=())
  with pytest.raises(ValueError, match="'vgg_like' cannot dilate.*output_stride=None"):
    segmentation.backbone_options("vgg_like", plain, 8, {})
  assert segmentation.backbone_options("vgg_like", plain, None, {"a": 1}) == {"a": 1}
  spec = tlflax.models.MODELS.get("resnet50")
  assert segmentation.backbone_options("resnet50", spec, 16, {}) == {
      "replace_stride_with_dilation": (False, False, True)}
  with pytest.raises(ValueError, match="output_stride must be 8, 16 or 32"):
    segmentation.backbone_options("resnet50", spec, 4, {})
  assert segmentation.deeplab_rates(16) == (6, 12, 18)
  assert segmentation.deeplab_rates(8) == (12, 24, 36)


class _OnlyDeepest(nn.Module):
  @nn.compact
  def __call__(self, x, train=False):
    return {"stride_32": x[:, ::32, ::32]}


def test_missing_feature_map_and_unknown_head_are_clear_errors():
  model = segmentation.SegmentationModel(_OnlyDeepest(), FCNHead(2), FCNHead(2, "stride_16"))
  with pytest.raises(KeyError, match=r"reads feature map 'stride_16'.*\['stride_32'\]"):
    model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 8)))
  with pytest.raises(KeyError, match="Unknown segmentation head 'deeplab'.*deeplabv3"):
    segmentation.build_segmentation_model("deeplab", _OnlyDeepest(), num_classes=2)
