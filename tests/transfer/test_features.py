"""Frozen feature extraction: the pooled maps and head probabilities equal the model's own."""
import jax
import numpy as np
import pytest

import tlflax
from tlflax import data
from tlflax.transfer import features


def relative_error(a, b) -> float:
  """Norm-wise, as every parity check here: ||a - b|| / ||b||."""
  return float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(np.asarray(b)))


@pytest.fixture(scope="module")
def tiny_model():
  return tlflax.create_model("mobilenet_v2", width_mult=0.25)


def test_extractor_equals_backbone_mean_and_model_softmax(tiny_model):
  module, variables = tiny_model
  x = np.random.default_rng(0).normal(size=(3, 32, 32, 3)).astype(np.float32)
  pooled, probs = features.make_extractor(module, ("stride_16", "stride_32", "pre_logits"))(
      variables, x)
  maps = module.apply(variables, x, method=lambda m, v: m.backbone(v, False))
  assert relative_error(pooled["stride_16"], maps["stride_16"].mean((1, 2))) < 1e-5
  assert relative_error(pooled["pre_logits"], maps["stride_32"].mean((1, 2))) < 1e-5
  want = jax.nn.softmax(module.apply(variables, x, train=False))
  assert relative_error(probs, want) < 1e-6
  assert probs.shape == (3, 1000)


def test_unknown_depth_is_named(tiny_model):
  module, variables = tiny_model
  with pytest.raises(ValueError, match="stride_64.*choose from"):
    features.make_extractor(module, ("stride_64",))(variables, np.zeros((1, 32, 32, 3)))


def test_split_batches_keep_order_labels_and_pad():
  cfg = data.default_config()
  cfg.name, cfg.image_size, cfg.eval_crop = "digits", 16, "resize"
  pipe = data.build(cfg, batch_size=50)
  batches = list(features.split_batches(pipe, "eval", (0.0,) * 3, (1.0,) * 3, 50))
  assert [len(labels) for _, labels in batches] == [50] * 7 + [10]  # 360 eval digits.
  assert all(images.shape == (50, 16, 16, 3) for images, _ in batches)
  assert not batches[-1][0][10:].any()  # Padding rows are zeros.
  want = pipe.records("eval").table["label"]
  np.testing.assert_array_equal(np.concatenate([labels for _, labels in batches]), want)
  # mean 0 / std 1: pixels / 255 of the resized 8x8 digit.
  assert 0.0 <= batches[0][0].min() and batches[0][0].max() <= 1.0 + 1e-6
