"""Inception-v3: exact parity with torchvision (random weights with non-trivial BN statistics).

torchvision's Inception3 has no width option, so the real-size model runs by
default at its minimum input, 75 px, batch 1. The references keep their
`AuxLogits` branch, so every parity run also checks that the converter drops it.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tlflax
from tests.models.parity import check_parity, convert, randomise_bn, relative_error, to_nchw
from tlflax.models import inception
from tlflax.pretrained import convert_torchvision, weights

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")

FEATURES = {"stride_4": "Conv2d_4a_3x3", "stride_8": "Mixed_5d", "stride_16": "Mixed_6e",
            "stride_32": "Mixed_7c"}


def reference(transform_input: bool, num_classes: int = 3):
  torch.manual_seed(0)
  return randomise_bn(torchvision.models.Inception3(
      num_classes=num_classes, aux_logits=True, transform_input=transform_input,
      init_weights=False))


def test_pretrained_configuration_matches_torchvision():
  """transform_input=True, as torchvision's inception_v3(weights=...) and tlflax's default."""
  x = np.random.RandomState(0).randn(1, 75, 75, 3).astype(np.float32)
  check_parity("inception_v3", reference(transform_input=True), x, FEATURES, tol=1e-5)


@pytest.mark.slow
def test_without_input_transform_matches_torchvision():
  x = np.random.RandomState(0).randn(2, 96, 96, 3).astype(np.float32)
  check_parity("inception_v3", reference(transform_input=False), x, FEATURES, tol=1e-5,
               transform_input=False)


def test_input_transform_is_torchvisions():
  model = reference(transform_input=True)
  x = np.random.RandomState(0).randn(2, 8, 8, 3).astype(np.float32)
  expected = model._transform_input(to_nchw(x)).numpy().transpose(0, 2, 3, 1)
  assert relative_error(inception.transform_input(jnp.asarray(x)), expected) < 1e-7
  backbone = tlflax.models.MODELS.get("inception_v3").backbone()
  assert backbone.transform_input


def test_feature_map_sizes_at_299_and_minimum_input():
  backbone = tlflax.models.MODELS.get("inception_v3").backbone()
  shapes = lambda size: jax.eval_shape(lambda: backbone.init_with_output(
      jax.random.key(0), jnp.zeros((1, size, size, 3), jnp.float32)))[0]
  assert {k: v.shape[1:] for k, v in shapes(299).items()} == {
      "stride_4": (71, 71, 192), "stride_8": (35, 35, 288), "stride_16": (17, 17, 768),
      "stride_32": (8, 8, 2048)}
  assert shapes(75)["stride_32"].shape == (1, 1, 1, 2048)
  with pytest.raises(ValueError, match="at least 75x75"):
    shapes(74)


def test_create_model_with_new_class_count():
  # Same arguments as the parity test above: its compiled init is reused.
  module, variables = tlflax.create_model("inception_v3", num_classes=3)
  assert variables["params"]["head"]["kernel"].shape == (2048, 3)
  assert "pre_logits" not in variables["params"] and module.dropout == 0.5
  assert tlflax.models.MODELS.get("inception_v3").init_size == 75


def test_converter_drops_aux_logits_and_rejects_unknown_modules():
  state = {k: v.numpy() for k, v in reference(transform_input=False).state_dict().items()}
  assert any(k.startswith("AuxLogits.") for k in state)
  flat = convert("inception_v3", reference(transform_input=False))
  assert not any("AuxLogits" in k for k in flat)
  assert flat["params/backbone/Mixed_6b/branch7x7_2/conv/kernel"].shape == (1, 7, 128, 128)
  state["Mixed_8a.branch1x1.conv.weight"] = state["Mixed_5b.branch1x1.conv.weight"]
  with pytest.raises(ValueError, match="Mixed_8a.branch1x1.conv"):
    convert_torchvision.CONVERTERS.get("torchvision:inception_v3")(state)


def test_registered_weight():
  weight = weights.for_model("inception_v3", True)
  assert (weight.tag, weight.file_name, weight.sha256) == (
      "inception_v3.tv_in1k", "inception_v3_google-0cc3c7bd.pth", "0cc3c7bd")
  assert (weight.input_size, weight.resize_size, weight.top1) == (299, 342, 77.294)
  assert weight.mean == weights.IMAGENET_MEAN and weight.std == weights.IMAGENET_STD
