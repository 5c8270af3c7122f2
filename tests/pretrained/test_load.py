"""Strict merge of converted weights into model variables."""
import numpy as np
import pytest

from tlflax.pretrained import load

VARIABLES = {"params": {"backbone": {"conv": {"kernel": np.zeros((3, 3, 3, 8), np.float32)}},
                        "head": {"kernel": np.zeros((8, 5), np.float32),
                                 "bias": np.zeros(5, np.float32)}}}
CHECKPOINT = {"params/backbone/conv/kernel": np.ones((3, 3, 3, 8), np.float32),
              "params/head/kernel": np.ones((8, 1000), np.float32),
              "params/head/bias": np.ones(1000, np.float32)}


def test_head_with_new_shape_is_reinitialised_and_reported():
  merged, report = load.merge(VARIABLES, CHECKPOINT)
  assert report["loaded"] == ["params/backbone/conv/kernel"]
  assert sorted(report["reinitialised"]) == ["params/head/bias", "params/head/kernel"]
  np.testing.assert_array_equal(merged["params"]["backbone"]["conv"]["kernel"], 1.0)
  np.testing.assert_array_equal(merged["params"]["head"]["kernel"], 0.0)


def test_missing_unexpected_and_mismatched_are_all_listed():
  checkpoint = {"params/backbone/conv/kernel": np.ones((3, 3, 3, 4), np.float32),
                "params/backbone/extra/kernel": np.ones(3, np.float32)}
  with pytest.raises(load.PretrainedMismatchError) as error:
    load.merge(VARIABLES, checkpoint)
  message = str(error.value)
  assert "shape mismatch: params/backbone/conv/kernel model (3, 3, 3, 8) checkpoint (3, 3, 3, 4)" in message
  assert "unexpected in checkpoint: params/backbone/extra/kernel" in message
  assert "2 mismatches" in message
  with pytest.raises(load.PretrainedMismatchError, match="missing in checkpoint: params/backbone"):
    load.merge(VARIABLES, {})
