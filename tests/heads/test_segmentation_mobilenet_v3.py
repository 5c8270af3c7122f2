"""DeepLabV3 on a dilated MobileNetV3: parity with torchvision's deeplabv3_mobilenet_v3_large
(its checkpoint converted as a downloaded file would be) and with its `dilated=True` backbone."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tlflax
from tests.models.parity import convert, randomise_bn, relative_error, to_nchw, torch_outputs
from tlflax.models import segmentation
from tlflax.pretrained import load

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")
from torchvision.models import segmentation as tv_seg  # noqa: E402

# torchvision's DeepLabHead keeps its output-stride-8 rates on this output-stride-16 model.
TORCHVISION_RATES = (12, 24, 36)


def test_deeplabv3_mobilenet_v3_large_matches_torchvision(tmp_path):
  """The whole model at real width, "out" (DeepLabHead on the 960-wide last conv, at
  stride 16) and "aux" (FCNHead on the 40-wide output of the first stride-8 block).
  209x75 input: odd sizes; 14 rows at stride 16, so the rate-12 ASPP taps read real
  rows (rates 24 and 36 only see padding at any size a test can afford)."""
  torch.manual_seed(0)
  reference = randomise_bn(tv_seg.deeplabv3_mobilenet_v3_large(
      weights=None, weights_backbone=None, num_classes=3, aux_loss=True))
  path = tmp_path / "deeplabv3_mobilenet_v3_large_random.pth"
  torch.save(reference.state_dict(), path)
  x = np.random.RandomState(0).randn(2, 209, 75, 3).astype(np.float32)
  with torch.no_grad():
    expected = {k: v.numpy().transpose(0, 2, 3, 1) for k, v in reference(to_nchw(x)).items()}

  module, variables = tlflax.create_segmentation_model(
      "deeplabv3", "mobilenet_v3_large", num_classes=3, output_stride=16, aux=True,
      head_kwargs={"rates": TORCHVISION_RATES})
  flat = load.converted_file(str(path), "deeplabv3_mobilenet_v3_large", "torchvision")
  variables, report = load.merge(variables, flat)
  assert not report["reinitialised"] and not report["unused"], report
  assert variables["params"]["aux_head"]["conv"]["conv"]["kernel"].shape == (3, 3, 40, 10)
  with jax.default_matmul_precision("highest"):
    outputs = jax.jit(module.apply)(variables, x)
  assert set(outputs) == set(expected) == {"out", "aux"}
  errors = {}
  for key, want in expected.items():
    assert outputs[key].shape == want.shape == (2, 209, 75, 3), key
    errors[key] = relative_error(outputs[key], want)
  assert max(errors.values()) < 1e-4, errors


def test_dilated_small_backbone_matches_torchvision_and_keeps_stride_16():
  """torchvision's `mobilenet_v3_small(dilated=True)` is `output_stride=16`: every map
  matches, and the last stage (`stride_32`, `entry_stride_32`) stays at 1/16 of the
  input while the earlier maps keep their strides. Backbone only: one compile."""
  torch.manual_seed(0)
  reference = randomise_bn(torchvision.models.mobilenet_v3_small(
      width_mult=0.25, dilated=True, num_classes=3))
  modules = {"stride_4": "features.1", "stride_8": "features.3", "stride_16": "features.8",
             "stride_32": "features.12", "entry_stride_8": "features.2",
             "entry_stride_16": "features.4", "entry_stride_32": "features.9"}
  x = np.random.RandomState(0).randn(2, 64, 64, 3).astype(np.float32)
  _, expected = torch_outputs(reference, x, modules)

  factory = tlflax.models.MODELS.get("mobilenet_v3_small").backbone
  backbone = factory(width_mult=0.25, output_stride=16)
  converted = convert("mobilenet_v3_small", reference)
  variables = load.unflatten({k.replace("/backbone/", "/", 1): v
                              for k, v in converted.items() if "/backbone/" in k})
  init = lambda module: jax.eval_shape(lambda: module.init_with_output(
      jax.random.key(0), jnp.zeros((1, 64, 64, 3))))
  features_shape, variables_shape = init(backbone)
  assert jax.tree.map(np.shape, variables) == jax.tree.map(np.shape, variables_shape)
  with jax.default_matmul_precision("highest"):
    features = jax.jit(backbone.apply)(variables, x)
  errors = {key: relative_error(features[key], want) for key, want in expected.items()}
  assert max(errors.values()) < 1e-5, errors

  sizes = lambda shapes: {k: v.shape[1] for k, v in shapes.items()}
  strided, dilated = sizes(init(factory(width_mult=0.25))[0]), sizes(features_shape)
  assert strided["stride_32"] == strided["entry_stride_32"] == 2
  assert dilated["stride_32"] == dilated["entry_stride_32"] == 4
  assert dilated == {**strided, "stride_32": 4, "entry_stride_32": 4}


def test_output_stride_options_and_default_aux_map():
  spec = tlflax.models.MODELS.get("mobilenet_v3_large")
  assert segmentation.backbone_options("mobilenet_v3_large", spec, 16, {}) == {
      "output_stride": 16}
  with pytest.raises(ValueError, match="output_stride must be 16 .* or 32, got 8"):
    segmentation.backbone_options("mobilenet_v3_large", spec, 8, {})
  assert spec.aux_feature == "entry_stride_8"
  assert tlflax.models.MODELS.get("resnet50").aux_feature == "stride_16"
