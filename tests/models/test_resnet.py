"""ResNet family: exact parity with torchvision (random weights with non-trivial BN statistics)."""
import jax
import numpy as np
import pytest

import tlflax
from tests.models.parity import check_parity, randomise_bn

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")

FEATURES = {"stride_4": "layer1", "stride_8": "layer2", "stride_16": "layer3",
            "stride_32": "layer4"}


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "resnext50_32x4d"])
def test_matches_torchvision(name):
  torch.manual_seed(0)
  reference = randomise_bn(getattr(torchvision.models, name)(num_classes=5))
  x = np.random.RandomState(0).randn(2, 64, 64, 3).astype(np.float32)
  check_parity(name, reference, x, FEATURES, tol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet34", "resnet101", "resnet152", "resnext101_32x8d",
                                  "wide_resnet50_2", "wide_resnet101_2"])
def test_large_variants_match_torchvision(name):
  torch.manual_seed(0)
  reference = randomise_bn(getattr(torchvision.models, name)(num_classes=5))
  x = np.random.RandomState(0).randn(1, 64, 64, 3).astype(np.float32)
  check_parity(name, reference, x, FEATURES, tol=1e-5)


def test_features_and_registered_weights():
  module, variables = tlflax.create_model("resnet18", base_channels=8)
  features = jax.jit(module.backbone.apply)(
      {k: v["backbone"] for k, v in variables.items()}, np.zeros((1, 64, 64, 3), np.float32))
  assert {k: (v.shape[1], v.shape[3]) for k, v in features.items()} == {
      "stride_4": (16, 8), "stride_8": (8, 16), "stride_16": (4, 32), "stride_32": (2, 64)}
  assert "resnet50" in tlflax.list_models(pretrained=True)
  from tlflax.pretrained import weights
  assert weights.for_model("resnet50", "tv2_in1k").resize_size == 232
