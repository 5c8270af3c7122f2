"""MobileNetV2: exact parity with torchvision (random tiny model and real ImageNet weights)."""
import jax
import numpy as np
import pytest

import tlflax
from tests.conftest import mobilenet_v2_weight_file
from tests.models.parity import check_parity, photo, randomise_bn, relative_error

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")


def torch_logits(model, x_nhwc):
  with torch.no_grad():
    return model(torch.from_numpy(x_nhwc.transpose(0, 3, 1, 2).copy())).numpy()


def test_random_tiny_model_matches_torchvision():
  torch.manual_seed(0)
  reference = randomise_bn(torchvision.models.mobilenet_v2(width_mult=0.25, num_classes=7))
  x = np.random.RandomState(0).randn(2, 64, 64, 3).astype(np.float32)
  check_parity("mobilenet_v2", reference, x, {
      "stride_4": "features.3", "stride_8": "features.6", "stride_16": "features.13",
      "stride_32": "features.18"}, tol=1e-5, width_mult=0.25)


def test_imagenet_weights_match_torchvision():
  path = mobilenet_v2_weight_file()
  reference = torchvision.models.mobilenet_v2().eval()
  reference.load_state_dict(torch.load(path, weights_only=True))
  module, variables = tlflax.create_model("mobilenet_v2", pretrained=True)
  x = np.stack([photo("chelsea"), np.random.RandomState(1).randn(224, 224, 3).astype(np.float32)])
  with jax.default_matmul_precision("highest"):
    logits = np.asarray(jax.jit(module.apply)(variables, x))
  expected = torch_logits(reference, x)
  for i in range(2):  # Norm-wise relative error per image, as in the contract.
    assert relative_error(logits[i], expected[i]) < 1e-4
  assert 281 <= logits[0].argmax() <= 285  # ImageNet's cat classes.
  assert logits[1].argmax() == expected[1].argmax()


def test_feature_maps_have_strides_4_to_32():
  module, variables = tlflax.create_model("mobilenet_v2", width_mult=0.25)
  x = np.zeros((1, 64, 64, 3), np.float32)
  features = jax.jit(module.backbone.apply)({k: v["backbone"] for k, v in variables.items()}, x)
  assert {k: v.shape[1] for k, v in features.items()} == {
      "stride_4": 16, "stride_8": 8, "stride_16": 4, "stride_32": 2}


def test_unknown_model_names_close_matches():
  with pytest.raises(KeyError, match="mobilenet_v2"):
    tlflax.create_model("mobilenetv2")


def test_head_is_reinitialised_for_new_class_count():
  mobilenet_v2_weight_file()
  _, variables = tlflax.create_model("mobilenet_v2", pretrained=True, num_classes=3)
  assert variables["params"]["head"]["kernel"].shape == (1280, 3)
  assert "mobilenet_v2" in tlflax.list_models("mobile*")


@pytest.mark.parametrize("name,kwargs", [("mobilenet_v2", {"width_mult": 0.25}),
                                         ("resnet18", {"base_channels": 8})])
def test_bfloat16_compute_keeps_float32_params_and_logits(name, kwargs):
  import jax.numpy as jnp
  x = np.random.RandomState(0).randn(2, 64, 64, 3).astype(np.float32)
  module32, variables = tlflax.create_model(name, num_classes=5, **kwargs)
  module16, variables16 = tlflax.create_model(name, num_classes=5, dtype=jnp.bfloat16, **kwargs)
  assert {v.dtype for v in jax.tree_util.tree_leaves(variables16)} == {np.dtype("float32")}
  reference = np.asarray(jax.jit(module32.apply)(variables, x))
  logits = jax.jit(module16.apply)(variables, x)  # Same float32 parameters, bf16 compute.
  assert logits.dtype == jnp.float32
  assert 0 < relative_error(logits, reference) < 0.05
