"""DenseNet family: exact parity with torchvision (random weights with non-trivial BN statistics)."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tlflax
from tests.models.parity import check_parity, randomise_bn
from tlflax.pretrained.convert_torchvision import CONVERTERS

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")

# The output of each dense block; for stride 32, norm5 + the ReLU torchvision
# applies in `forward` (hooked through the `relu5` module added by `reference`).
FEATURES = {"stride_4": "features.denseblock1", "stride_8": "features.denseblock2",
            "stride_16": "features.denseblock3", "stride_32": "features.relu5"}
# torchvision's DenseNet constructor arguments, mirrored by tlflax's DenseNet fields.
TINY = dict(growth_rate=8, block_config=(1, 2, 2, 1), num_init_features=16)


def reference(name=None, **kwargs):
  """A random torchvision DenseNet (5 classes) whose stride-32 map can be hooked.

  torchvision's final ReLU is a functional call in `forward`, not a module; a
  `relu5` module appended to `features` exposes it to a forward hook and leaves
  the logits unchanged (the functional ReLU after it is then idempotent).
  """
  torch.manual_seed(0)
  model = (getattr(torchvision.models, name)(num_classes=5) if name
           else torchvision.models.DenseNet(num_classes=5, **kwargs))
  model.features.add_module("relu5", torch.nn.ReLU())
  return randomise_bn(model)


def backbone_features(module, variables, x):
  backbone_vars = {k: v["backbone"] for k, v in variables.items() if "backbone" in v}
  return jax.jit(module.backbone.apply)(backbone_vars, x)


def test_tiny_matches_torchvision():
  x = np.random.RandomState(0).randn(2, 64, 64, 3).astype(np.float32)
  errors = check_parity("densenet121", reference(**TINY), x, FEATURES, tol=1e-5, **TINY)
  print("densenet tiny worst error:", max(errors.values()))


def test_densenet121_matches_torchvision():
  x = np.random.RandomState(0).randn(1, 32, 32, 3).astype(np.float32)
  errors = check_parity("densenet121", reference("densenet121"), x, FEATURES, tol=1e-5)
  print("densenet121 worst error:", max(errors.values()))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["densenet161", "densenet169", "densenet201"])
def test_large_variants_match_torchvision(name):
  x = np.random.RandomState(0).randn(1, 64, 64, 3).astype(np.float32)
  errors = check_parity(name, reference(name), x, FEATURES, tol=1e-5)
  print(f"{name} worst error:", max(errors.values()))


def _old_key(key: str) -> str:
  """The key as in torchvision's published files: `denselayer1.norm1` -> `denselayer1.norm.1`."""
  return re.sub(r"(denselayer\d+\.(?:norm|conv))([12])\.", r"\1.\2.", key)


def test_old_checkpoint_key_names_convert_identically():
  state_dict = {k: v.numpy() for k, v in reference(**TINY).state_dict().items()
                if "num_batches_tracked" not in k}  # The published files have no counters.
  old = {_old_key(k): v for k, v in state_dict.items()}
  assert "features.denseblock1.denselayer1.norm.1.weight" in old
  assert "features.denseblock1.denselayer1.conv.2.weight" in old
  convert_fn = CONVERTERS.get("torchvision:densenet121")
  new_flat, old_flat = convert_fn(state_dict), convert_fn(old)
  assert new_flat.keys() == old_flat.keys()
  assert all(np.array_equal(new_flat[k], old_flat[k]) for k in new_flat)
  with pytest.raises(ValueError, match="features.denseblock1.denselayer1.norm3"):
    convert_fn({**state_dict, "features.denseblock1.denselayer1.norm3.weight": np.ones(3)})


def test_features_and_registered_weights():
  module, variables = tlflax.create_model("densenet121", num_classes=3, **TINY)
  features = backbone_features(module, variables, np.zeros((1, 64, 64, 3), np.float32))
  assert {k: (v.shape[1], v.shape[3]) for k, v in features.items()} == {
      "stride_4": (16, 24), "stride_8": (8, 28), "stride_16": (4, 30), "stride_32": (2, 23)}
  assert variables["params"]["head"]["kernel"].shape == (23, 3)
  assert {"densenet121", "densenet161", "densenet169", "densenet201"} <= set(
      tlflax.list_models("densenet*", pretrained=True))
  from tlflax.pretrained import weights
  weight = weights.for_model("densenet161", True)
  assert (weight.sha256, weight.top1) == ("8d451a50", 77.138)


def test_memory_efficient_same_parameters_numbers_and_frozen_bn():
  """Rematerialised dense layers: same variables, outputs, gradients; frozen BN still frozen."""
  x = jnp.asarray(np.random.RandomState(1).randn(2, 32, 32, 3).astype(np.float32))
  frozen = (r"backbone/denseblock1/.*",)
  plain, variables = tlflax.create_model("densenet121", num_classes=3, frozen_bn=frozen, **TINY)
  remat, remat_vars = tlflax.create_model("densenet121", num_classes=3, frozen_bn=frozen,
                                          memory_efficient=True, **TINY)
  assert jax.tree.structure(variables) == jax.tree.structure(remat_vars)

  def loss_and_stats(module, params):
    logits, updates = module.apply({**variables, "params": params}, x, train=True,
                                   mutable=["batch_stats"])
    return jnp.sum(logits ** 2), updates["batch_stats"]

  jaxprs = [str(jax.make_jaxpr(lambda p, m=m: loss_and_stats(m, p))(variables["params"]))
            for m in (plain, remat)]
  assert "remat" not in jaxprs[0] and "remat" in jaxprs[1]  # Only the second checkpoints.
  with jax.default_matmul_precision("highest"):
    results = [jax.jit(jax.grad(lambda p, m=m: loss_and_stats(m, p), has_aux=True))(
        variables["params"]) for m in (plain, remat)]
  (grads, stats), (remat_grads, remat_stats) = results
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(remat_grads)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  for new_stats in (stats, remat_stats):
    block1 = new_stats["backbone"]["denseblock1"]
    old1 = variables["batch_stats"]["backbone"]["denseblock1"]
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(block1),
                                                     jax.tree.leaves(old1)))
    assert not np.array_equal(new_stats["backbone"]["norm5"]["mean"],
                              variables["batch_stats"]["backbone"]["norm5"]["mean"])
