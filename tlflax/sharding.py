"""Data parallelism over a device mesh: batches split along `data`, state replicated.

The same code runs on one CPU, on 8 fake CPU devices
(`XLA_FLAGS=--xla_force_host_platform_device_count=8`) and on many hosts:
each process hands over its local rows and `make_array_from_process_local_data`
assembles the global batch.
"""
from __future__ import annotations

import collections
from typing import Any, Iterator

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


def make_mesh() -> Mesh:
  return Mesh(np.asarray(jax.devices()), ("data",))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P("data"))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def check_batch_size(batch_size: int, name: str) -> None:
  devices = jax.device_count()
  if batch_size % devices:
    raise ValueError(f"{name}={batch_size} is not divisible by the {devices} devices; "
                     f"use a multiple of {devices}.")


def put_batch(batch: dict, sharding: NamedSharding) -> dict:
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in batch.items()}


def prefetch(batches: Iterator[dict], sharding: NamedSharding, size: int = 2) -> Iterator[dict]:
  """Keeps `size` batches in flight on the devices so the host never stalls the step."""
  queue = collections.deque()
  for batch in batches:
    queue.append(put_batch(batch, sharding))
    if len(queue) > size - 1:
      yield queue.popleft()
  while queue:
    yield queue.popleft()


def replicate(tree: Any, mesh: Mesh) -> Any:
  return jax.device_put(tree, replicated(mesh))
