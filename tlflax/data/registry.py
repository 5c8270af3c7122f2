"""The dataset registry: a name in the config -> a builder.

Every builder has one signature, `builder(config) -> SplitSource`, so the
pipeline never needs to know where the images come from.
"""
from __future__ import annotations

from typing import Callable

import ml_collections

from tlflax.data.source import Records, SplitSource  # noqa: F401 (re-export)
from tlflax.registry import Registry

Builder = Callable[[ml_collections.ConfigDict], SplitSource]

DATASETS = Registry("dataset")


def register_dataset(name: str) -> Callable[[Builder], Builder]:
  """`@register_dataset("name")` over `builder(config) -> SplitSource`."""
  return DATASETS.register(name)


def build_source(config: ml_collections.ConfigDict) -> SplitSource:
  """Runs `config.name`'s builder; unknown names list close matches."""
  source = DATASETS.get(config.name)(config)
  if not isinstance(source, SplitSource):
    raise TypeError(f"Dataset builder {config.name!r} returned "
                    f"{type(source).__name__}, expected SplitSource.")
  return source
