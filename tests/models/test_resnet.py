"""ResNet family: exact parity with torchvision (random weights with non-trivial BN statistics)."""
import jax
import numpy as np
import pytest

import tlflax
from tlflax.pretrained import convert_torchvision, load

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")


def randomise_bn(model):
  for m in model.modules():
    if isinstance(m, torch.nn.BatchNorm2d):
      m.running_mean.uniform_(-0.5, 0.5)
      m.running_var.uniform_(0.5, 2.0)
      m.weight.data.uniform_(0.5, 1.5)
      m.bias.data.uniform_(-0.2, 0.2)
  return model.eval()


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "resnext50_32x4d"])
def test_matches_torchvision(name):
  torch.manual_seed(0)
  reference = randomise_bn(getattr(torchvision.models, name)(num_classes=5))
  flat = convert_torchvision.CONVERTERS.get(f"torchvision:{name}")(
      {k: v.numpy() for k, v in reference.state_dict().items()})
  module, variables = tlflax.create_model(name, num_classes=5)
  variables, report = load.merge(variables, flat)
  assert not report["reinitialised"] and not report["unused"]
  x = np.random.RandomState(0).randn(2, 64, 64, 3).astype(np.float32)
  with jax.default_matmul_precision("highest"):
    logits = np.asarray(jax.jit(module.apply)(variables, x))
  with torch.no_grad():
    expected = reference(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
  assert np.linalg.norm(logits - expected) / np.linalg.norm(expected) < 1e-5


def test_features_and_registered_weights():
  module, variables = tlflax.create_model("resnet18", base_channels=8)
  features = jax.jit(module.backbone.apply)(
      {k: v["backbone"] for k, v in variables.items()}, np.zeros((1, 64, 64, 3), np.float32))
  assert {k: (v.shape[1], v.shape[3]) for k, v in features.items()} == {
      "stride_4": (16, 8), "stride_8": (8, 16), "stride_16": (4, 32), "stride_32": (2, 64)}
  assert "resnet50" in tlflax.list_models(pretrained=True)
  from tlflax.pretrained import weights
  assert weights.for_model("resnet50", "tv2_in1k").resize_size == 232
