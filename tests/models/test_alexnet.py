"""AlexNet: exact parity with torchvision (random weights).

torchvision's AlexNet takes no width argument; its features are cheap, its
classifier (fc6 9216 x 4096) is not, so the default test narrows only the
classifier; the real-size model runs with --runslow.
"""
import jax
import numpy as np
import pytest

import tlflax
from tests.models.parity import check_parity
from tests.models.test_vgg import assert_real_size_layout, check_narrow_parity
from tlflax.pretrained import convert_torchvision

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")

FEATURES = {"stride_4": "features.1", "stride_8": "features.2", "stride_16": "features.5",
            "stride_32": "features.12"}
FC_WIDTH = 24


def test_narrow_classifier_matches_torchvision():
  torch.manual_seed(0)
  reference = torchvision.models.alexnet(num_classes=5)
  nn = torch.nn
  reference.classifier = nn.Sequential(  # torchvision's layout (indices 1, 4, 6), narrowed.
      nn.Dropout(), nn.Linear(256 * 6 * 6, FC_WIDTH), nn.ReLU(True), nn.Dropout(),
      nn.Linear(FC_WIDTH, FC_WIDTH), nn.ReLU(True), nn.Linear(FC_WIDTH, 5))
  # 96 px: a 2x2 final map (not 1x1), so fc6's flatten order is exercised.
  x = np.random.RandomState(0).randn(2, 96, 96, 3).astype(np.float32)
  print("alexnet", check_narrow_parity("alexnet", reference.eval(), x, FEATURES, FC_WIDTH))


def test_real_size_layout_matches_torchvision():
  assert_real_size_layout("alexnet", convert_torchvision.rename_alexnet,
                          torchvision.models.AlexNet_Weights.IMAGENET1K_V1.meta["num_params"])


def test_features_strides_and_create_model():
  module, variables = tlflax.create_model("alexnet", num_classes=3)
  assert variables["params"]["head"]["kernel"].shape == (4096, 3)
  features = jax.eval_shape(module.backbone.apply,
                            {k: v["backbone"] for k, v in variables.items()},
                            np.zeros((1, 224, 224, 3), np.float32))
  assert {k: (v.shape[1], v.shape[3]) for k, v in features.items()} == {
      "stride_4": (55, 64), "stride_8": (27, 64), "stride_16": (13, 192), "stride_32": (6, 256)}
  # torchvision's minimum input size, 63 px, still gives a 1x1 map to pool.
  logits = jax.eval_shape(module.apply, variables, np.zeros((2, 63, 63, 3), np.float32))
  assert logits.shape == (2, 3)
  from tlflax.pretrained import weights
  assert weights.for_model("alexnet", True).file_name == "alexnet-owt-7be5be79.pth"


@pytest.mark.slow
def test_real_size_matches_torchvision():
  torch.manual_seed(0)
  reference = torchvision.models.alexnet(num_classes=5).eval()
  x = np.random.RandomState(0).randn(1, 96, 96, 3).astype(np.float32)
  print("alexnet", check_parity("alexnet", reference, x, FEATURES))
