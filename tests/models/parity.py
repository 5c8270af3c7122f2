"""Shared parity checks: a randomly initialised torchvision model vs its tlflax conversion.

`check_parity` converts the torch model's state dict with the registered
converter, merges it strictly into the tlflax model, and compares logits and
every returned feature map (norm-wise relative error, highest matmul precision).
"""
from typing import Dict, Mapping, Optional

import jax
import numpy as np
import pytest

import tlflax
from tlflax.pretrained import convert_torchvision, load
from tlflax.pretrained.weights import IMAGENET_MEAN, IMAGENET_STD

torch = pytest.importorskip("torch")


def relative_error(a, b) -> float:
  """Norm-wise relative error ||a - b|| / ||b|| over the whole tensor."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def randomise_bn(model):
  """Non-trivial BatchNorm statistics and affine terms, so their conversion is checked."""
  for m in model.modules():
    if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.BatchNorm1d)):
      m.running_mean.uniform_(-0.5, 0.5)
      m.running_var.uniform_(0.5, 2.0)
      m.weight.data.uniform_(0.5, 1.5)
      m.bias.data.uniform_(-0.2, 0.2)
  return model.eval()


def photo(name: str = "chelsea", size: int = 224, mean=IMAGENET_MEAN, std=IMAGENET_STD):
  """A real photo from scikit-image (`chelsea`: a cat, `coffee`: an espresso), normalised NHWC."""
  from PIL import Image
  from skimage import data as skimage_data
  image = Image.fromarray(getattr(skimage_data, name)()).resize((size, size), Image.BILINEAR)
  return ((np.asarray(image, np.float32) / 255 - mean) / std).astype(np.float32)


def to_nchw(x_nhwc: np.ndarray):
  return torch.from_numpy(np.ascontiguousarray(x_nhwc.transpose(0, 3, 1, 2)))


def torch_outputs(model, x_nhwc: np.ndarray, feature_modules: Mapping[str, str]):
  """Logits and the outputs (NHWC) of the named torch submodules, via forward hooks."""
  captured, handles = {}, []
  modules = dict(model.named_modules())
  for key, module_name in feature_modules.items():
    def hook(_, __, output, key=key):
      captured[key] = output.detach().numpy().transpose(0, 2, 3, 1)
    handles.append(modules[module_name].register_forward_hook(hook))
  try:
    with torch.no_grad():
      logits = model(to_nchw(x_nhwc)).numpy()
  finally:
    for h in handles:
      h.remove()
  return logits, captured


def convert(name: str, reference, source_format: str = "torchvision"):
  """The flat tlflax variables of a torch model's state dict."""
  state_dict = {k: v.detach().numpy() for k, v in reference.state_dict().items()}
  return convert_torchvision.CONVERTERS.get(f"{source_format}:{name}")(state_dict)


def check_parity(name: str, reference, x_nhwc: np.ndarray,
                 feature_modules: Optional[Mapping[str, str]] = None, tol: float = 1e-4,
                 source_format: str = "torchvision", **model_kwargs) -> Dict[str, float]:
  """Asserts logits (and features) of `name` match `reference`; returns the errors."""
  num_classes = [p for p in reference.state_dict().values()][-1].shape[0]
  module, variables = tlflax.create_model(name, num_classes=num_classes, **model_kwargs)
  variables, report = load.merge(variables, convert(name, reference, source_format))
  assert not report["reinitialised"] and not report["unused"], report
  feature_modules = feature_modules or {}
  expected_logits, expected_features = torch_outputs(reference.eval(), x_nhwc, feature_modules)
  with jax.default_matmul_precision("highest"):
    logits = jax.jit(module.apply)(variables, x_nhwc)
    backbone_vars = {k: v["backbone"] for k, v in variables.items() if "backbone" in v}
    features = jax.jit(module.backbone.apply)(backbone_vars, x_nhwc)
  errors = {"logits": relative_error(logits, expected_logits)}
  for key in feature_modules:
    assert features[key].shape == expected_features[key].shape, (key, features[key].shape)
    errors[key] = relative_error(features[key], expected_features[key])
  assert set(features) >= set(feature_modules)
  assert max(errors.values()) < tol, errors
  return errors
