"""MobileNetV3-Small/Large: exact parity with torchvision (random weights, non-trivial BN).

Tiny widths (width_mult=0.25) run by default, the real widths with --runslow;
the references are torchvision's own constructors at the same `width_mult`
(which also scales the pre-logits layer: 1024 * 0.25 for Small).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tlflax
from tests.models.parity import check_parity, convert, randomise_bn, relative_error, to_nchw
from tlflax.pretrained import convert_torchvision, load, weights

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")

FEATURES = {
    "mobilenet_v3_small": {"stride_4": "features.1", "stride_8": "features.3",
                           "stride_16": "features.8", "stride_32": "features.12",
                           "entry_stride_4": "features.1", "entry_stride_8": "features.2",
                           "entry_stride_16": "features.4", "entry_stride_32": "features.9"},
    "mobilenet_v3_large": {"stride_4": "features.3", "stride_8": "features.6",
                           "stride_16": "features.12", "stride_32": "features.16",
                           "entry_stride_4": "features.2", "entry_stride_8": "features.4",
                           "entry_stride_16": "features.7", "entry_stride_32": "features.13"},
}
TINY = dict(width_mult=0.25)


def reference(name, width_mult=1.0, num_classes=3):
  """A torchvision MobileNetV3 with random weights and BN statistics."""
  torch.manual_seed(0)
  model = getattr(torchvision.models, name)(width_mult=width_mult, num_classes=num_classes)
  return randomise_bn(model)


def test_small_tiny_matches_torchvision():
  x = np.random.RandomState(0).randn(2, 64, 64, 3).astype(np.float32)
  errors = check_parity("mobilenet_v3_small", reference("mobilenet_v3_small", 0.25), x,
                        FEATURES["mobilenet_v3_small"], tol=1e-5, **TINY)
  assert errors["logits"] < 1e-5


@pytest.mark.slow
def test_large_tiny_matches_torchvision():
  x = np.random.RandomState(0).randn(2, 64, 64, 3).astype(np.float32)
  check_parity("mobilenet_v3_large", reference("mobilenet_v3_large", 0.25), x,
               FEATURES["mobilenet_v3_large"], tol=1e-5, **TINY)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mobilenet_v3_small", "mobilenet_v3_large"])
def test_real_width_matches_torchvision(name):
  # torchvision's own constructor: real widths, real classifier.
  torch.manual_seed(0)
  model = randomise_bn(getattr(torchvision.models, name)(num_classes=5))
  x = np.random.RandomState(0).randn(1, 64, 64, 3).astype(np.float32)
  check_parity(name, model, x, FEATURES[name], tol=1e-5)


def test_batch_norm_momentum_matches_torch_in_training():
  """One training-mode step moves the running means as torch's momentum 0.01 does."""
  name = "mobilenet_v3_small"
  model = reference(name, 0.25)
  module, variables = tlflax.create_model(name, num_classes=3, **TINY)  # Cached by the test above.
  variables, _ = load.merge(variables, convert(name, model))
  x = np.random.RandomState(1).randn(2, 64, 64, 3).astype(np.float32)
  model.train()
  with torch.no_grad():
    model(to_nchw(x))
  expected = convert(name, model)
  with jax.default_matmul_precision("highest"):
    _, updates = jax.jit(lambda v, x: module.apply(v, x, train=True, mutable=["batch_stats"],
                                                   rngs={"dropout": jax.random.key(0)}))(
                                                       variables, x)
  flat = load.flatten(updates)
  means = [k for k in expected if k.startswith("batch_stats/") and k.endswith("/mean")]
  assert len(means) > 20
  for key in means:
    assert relative_error(flat[key], expected[key]) < 1e-4, key


@pytest.mark.parametrize("name,channels", [
    ("mobilenet_v3_small", {"stride_4": 8, "stride_8": 8, "stride_16": 16, "stride_32": 144,
                            "entry_stride_4": 8, "entry_stride_8": 8, "entry_stride_16": 16,
                            "entry_stride_32": 24}),
    ("mobilenet_v3_large", {"stride_4": 8, "stride_8": 16, "stride_16": 32, "stride_32": 240,
                            "entry_stride_4": 8, "entry_stride_8": 16, "entry_stride_16": 24,
                            "entry_stride_32": 40}),
])
def test_feature_maps_have_strides_4_to_32(name, channels):
  spec = tlflax.models.MODELS.get(name)
  backbone = spec.backbone(**TINY)
  x = jnp.zeros((1, 64, 64, 3), jnp.float32)
  features, _ = jax.eval_shape(lambda: backbone.init_with_output(jax.random.key(0), x))
  size = lambda key: 64 // int(key.rsplit("_", 1)[1])
  assert {k: v.shape[1:] for k, v in features.items()} == {
      k: (size(k), size(k), c) for k, c in channels.items()}


def test_create_model_with_new_class_count():
  module, variables = tlflax.create_model("mobilenet_v3_small", num_classes=3, **TINY)
  # torchvision's last_channel follows width_mult: _make_divisible(1024 * 0.25) = 256.
  assert variables["params"]["pre_logits"]["fc"]["kernel"].shape == (144, 256)
  assert variables["params"]["head"]["kernel"].shape == (256, 3)
  assert module.dropout == 0.2
  backbone = variables["params"]["backbone"]
  assert "features_12" in backbone and "features_13" not in backbone
  assert set(backbone["features_1"]) == {"dw", "se", "project"}  # No expand: 16 -> 16.


def test_converter_rejects_unknown_modules():
  state = {k: v.numpy() for k, v in reference("mobilenet_v3_small", 0.25).state_dict().items()}
  state["features.1.block.9.0.weight"] = np.zeros((8, 8, 1, 1), np.float32)
  with pytest.raises(ValueError, match="features.1.block"):
    convert_torchvision.CONVERTERS.get("torchvision:mobilenet_v3_small")(state)
  with pytest.raises(ValueError, match="extra.0"):
    convert_torchvision.rename_mobilenet_v3("extra.0", {})


def test_registered_weights():
  assert tlflax.list_models("mobilenet_v3_*", pretrained=True) == [
      "mobilenet_v3_large", "mobilenet_v3_small"]
  large = weights.for_model("mobilenet_v3_large", True)
  assert (large.file_name, large.top1, large.resize_size) == (
      "mobilenet_v3_large-8738ca79.pth", 74.042, 256)
  assert weights.for_model("mobilenet_v3_large", "tv2_in1k").resize_size == 232
  assert weights.for_model("mobilenet_v3_small", True).sha256 == "047dcff4"
