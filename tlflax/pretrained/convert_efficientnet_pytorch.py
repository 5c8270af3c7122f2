"""EfficientNet-PyTorch state dicts (lukemelas naming, also used by the Lite ports) -> tlflax.

The checkpoint numbers its MBConv blocks flatly (`_blocks.0` ... `_blocks.15`)
where tlflax, like torchvision, numbers them per stage (`features_1_0`,
`features_2_0`, `features_2_1`, ...), so the renaming needs the repeats of
each stage. The tensors themselves follow torchvision's rules
(`convert_torchvision.convert_tensor`).

  _conv_stem, _bn0                  -> backbone/features_0/{conv,bn}
  _blocks.N._expand_conv, ._bn0     -> backbone/features_i_j/expand/{conv,bn}
  _blocks.N._depthwise_conv, ._bn1  -> backbone/features_i_j/dw/{conv,bn}
  _blocks.N._se_reduce, ._se_expand -> backbone/features_i_j/se/{fc1,fc2}
  _blocks.N._project_conv, ._bn2    -> backbone/features_i_j/project/{conv,bn}
  _conv_head, _bn1                  -> backbone/features_8/{conv,bn}
  _fc                               -> head
"""
from __future__ import annotations

import re
from typing import Callable, Mapping, Sequence, Tuple

import numpy as np

from tlflax.pretrained.convert_torchvision import CONVERTERS, Flat, convert_state_dict

# Blocks per stage of EfficientNet-B0 and -Lite0 (the paper's Table 1).
LITE0_REPEATS: Tuple[int, ...] = (1, 2, 2, 3, 3, 4, 1)

_BLOCK_LAYERS = {
    "_expand_conv": "expand/conv", "_bn0": "expand/bn",
    "_depthwise_conv": "dw/conv", "_bn1": "dw/bn",
    "_se_reduce": "se/fc1", "_se_expand": "se/fc2",
    "_project_conv": "project/conv", "_bn2": "project/bn",
}


def block_names(repeats: Sequence[int]) -> Tuple[str, ...]:
  """Flat block index -> `features_<stage>_<j>` (stages count from 1; 0 is the stem)."""
  return tuple(f"features_{stage}_{j}" for stage, n in enumerate(repeats, start=1)
               for j in range(n))


def make_rename(repeats: Sequence[int]) -> Callable[[str, Mapping[str, np.ndarray]], str]:
  """The rename function for a network with `repeats` blocks per stage."""
  blocks = block_names(repeats)
  head = f"backbone/features_{len(repeats) + 1}"
  top = {"_conv_stem": "backbone/features_0/conv", "_bn0": "backbone/features_0/bn",
         "_conv_head": f"{head}/conv", "_bn1": f"{head}/bn", "_fc": "head"}

  def rename(prefix: str, state_dict: Mapping[str, np.ndarray]) -> str:
    del state_dict
    if prefix in top:
      return top[prefix]
    m = re.fullmatch(r"_blocks\.(\d+)\.(\w+)", prefix)
    if m and int(m[1]) < len(blocks) and m[2] in _BLOCK_LAYERS:
      return f"backbone/{blocks[int(m[1])]}/{_BLOCK_LAYERS[m[2]]}"
    raise ValueError(
        f"Unexpected module {prefix!r} in an EfficientNet-PyTorch checkpoint with "
        f"{len(blocks)} blocks (expected {', '.join(top)} or _blocks.<0..{len(blocks) - 1}>."
        f"{{{', '.join(_BLOCK_LAYERS)}}}). Is it the checkpoint of another variant?")

  return rename


def convert_lite0(state_dict: Mapping[str, np.ndarray]) -> Flat:
  return convert_state_dict(state_dict, make_rename(LITE0_REPEATS))


CONVERTERS.register("efficientnet_pytorch:efficientnet_lite0", convert_lite0)
