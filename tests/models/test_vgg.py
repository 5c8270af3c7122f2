"""VGG family: exact parity with torchvision (random weights, non-trivial BN statistics).

Real-width VGG spends its time on fc6 (25088 x 4096, 100M parameters): 15-30 s
and 2.5 GB per model here just to create, convert and run it. The default tests use
torchvision's own `VGG(make_layers(cfg))` with a narrow config and a narrow
classifier, built on the tlflax side from the registered spec with the same
widths; the real-size variants run with --runslow.
"""
import jax
import numpy as np
import pytest

import tlflax
from tests.models.parity import (check_parity, convert, randomise_bn, relative_error,
                                 torch_outputs)
from tlflax.models import MODELS, init_variables, vgg
from tlflax.models.classifier import ImageClassifier
from tlflax.pretrained import convert_torchvision, load

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")

TINY_CONFIG = (8, "M", 8, 8, "M", 16, "M", 16, 16, "M", 32, "M")  # Two-conv blocks, 5 pools.
FC_WIDTH = 24


def pool_outputs(reference):
  """torch module names of the maps after max-pools 2..5, keyed stride_4..stride_32."""
  pools = [i for i, m in enumerate(reference.features) if isinstance(m, torch.nn.MaxPool2d)]
  return {f"stride_{2 ** k}": f"features.{i}" for k, i in enumerate(pools, 1) if k >= 2}


def tiny_reference(batch_norm: bool, num_classes: int = 5):
  """torchvision's VGG class on a narrow config, its classifier narrowed (same indices)."""
  torch.manual_seed(0)
  reference = torchvision.models.VGG(
      torchvision.models.vgg.make_layers(list(TINY_CONFIG), batch_norm), num_classes)
  nn = torch.nn
  reference.classifier = nn.Sequential(
      nn.Linear(TINY_CONFIG[-2] * 7 * 7, FC_WIDTH), nn.ReLU(True), nn.Dropout(),
      nn.Linear(FC_WIDTH, FC_WIDTH), nn.ReLU(True), nn.Dropout(),
      nn.Linear(FC_WIDTH, num_classes))
  return randomise_bn(reference)


def check_narrow_parity(name, reference, x, feature_modules, fc_width, **backbone_kwargs):
  """`check_parity` for fc6/fc7 of width `fc_width`, which `create_model` can't set.

  The classifier is assembled from the registered spec (its pool size,
  dropout placement and init), only the Dense widths differ.
  """
  spec = MODELS.get(name)
  num_classes = list(reference.state_dict().values())[-1].shape[0]
  module = ImageClassifier(spec.backbone(**backbone_kwargs), num_classes, spec.dropout,
                           spec.pre_logits(features=fc_width))
  variables, report = load.merge(init_variables(module, 0, spec.init_size),
                                 convert(name, reference))
  assert not report["reinitialised"] and not report["unused"], report
  expected_logits, expected = torch_outputs(reference.eval(), x, feature_modules)
  with jax.default_matmul_precision("highest"):
    logits = jax.jit(module.apply)(variables, x)
    features = jax.jit(module.backbone.apply)(
        {k: v["backbone"] for k, v in variables.items()}, x)
  errors = {"logits": relative_error(logits, expected_logits)}
  for key, value in expected.items():
    assert features[key].shape == value.shape, (key, features[key].shape, value.shape)
    errors[key] = relative_error(features[key], value)
  assert set(features) == set(feature_modules)
  assert max(errors.values()) < 1e-4, errors
  return errors


@pytest.mark.parametrize("name,batch_norm", [("vgg11", False), ("vgg11_bn", True)])
def test_narrow_model_matches_torchvision(name, batch_norm):
  reference = tiny_reference(batch_norm)
  # 64 px: a 2x2 final map, pooled to 7x7 by overlapping bins, so fc6's flatten order matters.
  x = np.random.RandomState(0).randn(2, 64, 64, 3).astype(np.float32)
  print(name, check_narrow_parity(name, reference, x, pool_outputs(reference), FC_WIDTH,
                                  config=TINY_CONFIG))


@pytest.mark.parametrize("size,output", [((1, 1), 7), ((2, 2), 7), ((5, 9), 6), ((6, 6), 6),
                                         ((8, 13), 7), ((14, 15), 6)])
def test_adaptive_avg_pool_matches_torch(size, output):
  """Smaller, equal, non-multiple and larger inputs; non-square maps pool per axis."""
  x = np.random.RandomState(0).randn(2, *size, 3).astype(np.float32)
  expected = torch.nn.functional.adaptive_avg_pool2d(
      torch.from_numpy(x.transpose(0, 3, 1, 2)), output).numpy().transpose(0, 2, 3, 1)
  np.testing.assert_allclose(vgg.adaptive_avg_pool(x, (output, output)), expected,
                             rtol=1e-6, atol=1e-6)


def test_features_strides_and_create_model():
  # create_model sizes the backbone from kwargs; fc6/fc7 stay 4096 wide.
  module, variables = tlflax.create_model("vgg11_bn", num_classes=3, config=TINY_CONFIG)
  assert variables["params"]["pre_logits"]["fc6"]["kernel"].shape == (32 * 7 * 7, 4096)
  assert variables["params"]["head"]["kernel"].shape == (4096, 3)
  backbone_vars = {k: v["backbone"] for k, v in variables.items()}
  features = jax.eval_shape(module.backbone.apply, backbone_vars,
                            np.zeros((1, 64, 64, 3), np.float32))
  assert {k: (v.shape[1], v.shape[3]) for k, v in features.items()} == {
      "stride_4": (16, 8), "stride_8": (8, 16), "stride_16": (4, 16), "stride_32": (2, 32)}
  logits = jax.eval_shape(module.apply, variables, np.zeros((2, 40, 40, 3), np.float32))
  assert logits.shape == (2, 3)
  # Training traces too (dropout in pre_logits and before the head, BN statistics update).
  logits, updates = jax.eval_shape(
      lambda v, x: module.apply(v, x, train=True, rngs={"dropout": jax.random.key(0)},
                                mutable=["batch_stats"]), variables, np.zeros((2, 40, 40, 3)))
  assert logits.shape == (2, 3) and "features_1" in updates["batch_stats"]["backbone"]


def _flax_shape(leaf: str, shape):
  """Shape of a converted torch tensor (conv OIHW -> HWIO, linear (O, I) -> (I, O))."""
  if leaf == "weight" and len(shape) == 4:
    return (shape[2], shape[3], shape[1], shape[0])
  return tuple(reversed(shape)) if leaf == "weight" and len(shape) == 2 else tuple(shape)


def assert_real_size_layout(name, rename, published_num_params):
  """Every tensor of the real-size torchvision model maps onto a tlflax variable of the
  right shape, and the parameter count is the published one. Nothing is allocated: torch
  builds on the meta device, flax through eval_shape."""
  with torch.device("meta"):
    state = getattr(torchvision.models, name)().state_dict()
  expected = {}
  for key, value in state.items():
    prefix, leaf = key.rsplit(".", 1)
    if leaf != "num_batches_tracked":
      expected[(rename(prefix, state), leaf)] = _flax_shape(leaf, tuple(value.shape))
  spec = MODELS.get(name)
  module = ImageClassifier(spec.backbone(), 1000, spec.dropout, spec.pre_logits())
  x = np.zeros((1, spec.init_size, spec.init_size, 3), np.float32)
  flat = load.flatten(jax.eval_shape(module.init, jax.random.key(0), x))
  torch_leaf = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean",
                "var": "running_var"}
  actual = {}
  for key, value in flat.items():
    path, leaf = key.split("/", 1)[1].rsplit("/", 1)
    actual[(path, torch_leaf[leaf])] = tuple(value.shape)
  assert actual == expected
  assert sum(int(np.prod(v.shape)) for k, v in flat.items()
             if k.startswith("params/")) == published_num_params


@pytest.mark.parametrize("name", sorted(vgg.MODEL_SPECS))
def test_real_size_layout_matches_torchvision(name):
  weights = getattr(torchvision.models, f"{name.upper()}_Weights").IMAGENET1K_V1
  assert_real_size_layout(name, convert_torchvision.rename_vgg, weights.meta["num_params"])


def test_registered_weights():
  from tlflax.pretrained import weights
  assert set(tlflax.list_models("vgg*", pretrained=True)) == set(vgg.MODEL_SPECS)
  weight = weights.for_model("vgg16_bn", True)
  assert (weight.file_name, weight.sha256, weight.top1) == ("vgg16_bn-6c64b313.pth", "6c64b313",
                                                            73.360)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(vgg.MODEL_SPECS))
def test_real_size_matches_torchvision(name):
  torch.manual_seed(0)
  reference = randomise_bn(getattr(torchvision.models, name)(num_classes=5))
  x = np.random.RandomState(0).randn(1, 64, 64, 3).astype(np.float32)
  print(name, check_parity(name, reference, x, pool_outputs(reference)))
