import pytest

from tlflax.registry import Registry


def test_register_get_and_close_matches():
  reg = Registry("widget")
  reg.register("resnet50", 1)

  @reg.register("resnet18")
  def build():
    return 2
  assert reg.get("resnet18") is build and reg.names("resnet*") == ["resnet18", "resnet50"]
  with pytest.raises(KeyError, match="Did you mean: resnet50"):
    reg.get("resnet5O")
  with pytest.raises(ValueError, match="twice"):
    reg.register("resnet50", 3)
