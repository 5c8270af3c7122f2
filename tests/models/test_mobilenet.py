"""MobileNetV2: exact parity with torchvision (random tiny model and real ImageNet weights)."""
import jax
import numpy as np
import pytest

import tlflax
from tests.conftest import mobilenet_v2_weight_file
from tlflax.pretrained import convert_torchvision, load
from tlflax.pretrained.weights import IMAGENET_MEAN, IMAGENET_STD

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")


def relative_error(a, b):
  return float(np.linalg.norm(np.asarray(a) - b) / np.linalg.norm(b))


def torch_logits(model, x_nhwc):
  with torch.no_grad():
    return model(torch.from_numpy(x_nhwc.transpose(0, 3, 1, 2).copy())).numpy()


def test_random_tiny_model_matches_torchvision():
  torch.manual_seed(0)
  reference = torchvision.models.mobilenet_v2(width_mult=0.25, num_classes=7).eval()
  for m in reference.modules():  # Non-trivial BN statistics, so their conversion is checked.
    if isinstance(m, torch.nn.BatchNorm2d):
      m.running_mean.uniform_(-0.5, 0.5)
      m.running_var.uniform_(0.5, 2.0)
  flat = convert_torchvision.CONVERTERS.get("torchvision:mobilenet_v2")(
      {k: v.numpy() for k, v in reference.state_dict().items()})
  module, variables = tlflax.create_model("mobilenet_v2", num_classes=7, width_mult=0.25)
  variables, report = load.merge(variables, flat)
  assert not report["reinitialised"] and not report["unused"]
  x = np.random.RandomState(0).randn(2, 64, 64, 3).astype(np.float32)
  with jax.default_matmul_precision("highest"):
    logits = jax.jit(module.apply)(variables, x)
  assert relative_error(logits, torch_logits(reference, x)) < 1e-5


def cat_photo(size=224):
  from PIL import Image
  from skimage import data as skimage_data
  image = Image.fromarray(skimage_data.chelsea()).resize((size, size), Image.BILINEAR)
  return ((np.asarray(image, np.float32) / 255 - IMAGENET_MEAN) / IMAGENET_STD).astype(np.float32)


def test_imagenet_weights_match_torchvision():
  path = mobilenet_v2_weight_file()
  reference = torchvision.models.mobilenet_v2().eval()
  reference.load_state_dict(torch.load(path, weights_only=True))
  module, variables = tlflax.create_model("mobilenet_v2", pretrained=True)
  x = np.stack([cat_photo(), np.random.RandomState(1).randn(224, 224, 3).astype(np.float32)])
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
