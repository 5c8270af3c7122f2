"""Fixtures for the data tests; puts the repo root on sys.path."""
import os
from pathlib import Path
import sys

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
  sys.path.insert(0, str(REPO))

SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture
def digits_config():
  from tlflax import data  # pylint: disable=g-import-not-at-top
  config = data.default_config()
  config.name = "digits"
  config.image_size = 16
  config.train_crop = "random_resized_crop"
  config.crop_scale = (0.5, 1.0)
  config.eval_crop = "resize"
  return config


@pytest.fixture(scope="session")
def hymenoptera():
  path = SHARED_DATA / "hymenoptera"
  if not path.is_dir():
    pytest.skip(f"shared data set not found at {path} (expected the "
                "hymenoptera folder under ../shared/data next to the repo)")
  return path
