"""Mixup and CutMix inside the jitted train step (classification).

Done on the device batch, as big_vision and timm do, rather than in tf.data:
the partner of each image is the batch flipped (row i with row B-1-i), and
the loss becomes `lam * CE(label) + (1 - lam) * CE(partner's label)`, which
equals cross-entropy against the mixed one-hot targets (cross-entropy is
linear in the target). One `lam` per batch, drawn from the step's key, so a
resumed run mixes exactly as the uninterrupted one.

  mixup:  x = lam * x + (1 - lam) * x_flipped,  lam ~ Beta(alpha, alpha)
  cutmix: a box of area (1 - lam) * H * W (centre uniform, clipped to the
          image) is pasted from x_flipped; lam is then the kept area fraction.
With both alphas > 0, each batch uses cutmix with probability `switch_prob`;
`prob` is the chance that a batch is mixed at all.
"""
from __future__ import annotations

from typing import Any, Dict, Mapping

import jax
import jax.numpy as jnp
import ml_collections


def default_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.mixup_alpha = 0.0  # > 0 turns mixup on (timm's usual: 0.8; BiT: 0.1).
  c.cutmix_alpha = 0.0  # > 0 turns cutmix on (timm's usual: 1.0).
  c.prob = 1.0  # Chance that a batch is mixed.
  c.switch_prob = 0.5  # With both on: chance of cutmix rather than mixup.
  return c


def enabled(cfg: Mapping[str, Any] | None) -> bool:
  return bool(cfg) and (cfg.get("mixup_alpha", 0.0) > 0 or cfg.get("cutmix_alpha", 0.0) > 0)


def check(cfg: Mapping[str, Any], task: str) -> None:
  """Clear errors for values that would silently do something else."""
  for name in ("mixup_alpha", "cutmix_alpha"):
    if cfg.get(name, 0.0) < 0:
      raise ValueError(f"mixup.{name}={cfg[name]} is negative; use 0 (off) or > 0.")
  for name in ("prob", "switch_prob"):
    if not 0.0 <= cfg.get(name, 0.0) <= 1.0:
      raise ValueError(f"mixup.{name}={cfg[name]} is not a probability in [0, 1].")
  if enabled(cfg) and task != "classification":
    raise ValueError(f"mixup/cutmix mix class labels; config.task={task!r} has none. Set "
                     "mixup.mixup_alpha and mixup.cutmix_alpha to 0.")


def cutmix_mask(rng, lam, height: int, width: int):
  """[H, W] float mask, 1 inside the pasted box, and the kept fraction (the new lam)."""
  ky, kx = jax.random.split(rng)
  cut = jnp.sqrt(1.0 - lam)
  cy = jax.random.uniform(ky, (), minval=0, maxval=height)
  cx = jax.random.uniform(kx, (), minval=0, maxval=width)
  y0, y1 = jnp.clip(jnp.round(cy - cut * height / 2), 0, height), jnp.clip(
      jnp.round(cy + cut * height / 2), 0, height)
  x0, x1 = jnp.clip(jnp.round(cx - cut * width / 2), 0, width), jnp.clip(
      jnp.round(cx + cut * width / 2), 0, width)
  ys, xs = jnp.arange(height)[:, None], jnp.arange(width)[None, :]
  box = ((ys >= y0) & (ys < y1) & (xs >= x0) & (xs < x1)).astype(jnp.float32)
  return box, 1.0 - (y1 - y0) * (x1 - x0) / (height * width)


def mix_batch(batch: Dict[str, jnp.ndarray], rng, cfg: Mapping[str, Any]) -> Dict[str, jnp.ndarray]:
  """The batch with mixed images, plus `mix_label` (partner labels) and scalar `mix_lam`."""
  k_apply, k_switch, k_mix, k_cut, k_box = jax.random.split(rng, 5)
  images = batch["image"]
  partner = images[::-1]
  mixup_a, cutmix_a = cfg.get("mixup_alpha", 0.0), cfg.get("cutmix_alpha", 0.0)
  use_cutmix = (jax.random.uniform(k_switch) < cfg.get("switch_prob", 0.5)) if (
      mixup_a > 0 and cutmix_a > 0) else jnp.asarray(cutmix_a > 0)
  lam_mix = jax.random.beta(k_mix, mixup_a, mixup_a) if mixup_a > 0 else jnp.asarray(1.0)
  lam_cut = jax.random.beta(k_cut, cutmix_a, cutmix_a) if cutmix_a > 0 else jnp.asarray(1.0)
  box, lam_box = cutmix_mask(k_box, lam_cut, images.shape[1], images.shape[2])
  mixed_mix = lam_mix * images + (1.0 - lam_mix) * partner
  mixed_cut = jnp.where(box[None, :, :, None] > 0, partner, images)
  apply = jax.random.uniform(k_apply) < cfg.get("prob", 1.0)
  lam = jnp.where(apply, jnp.where(use_cutmix, lam_box, lam_mix), 1.0)
  mixed = jnp.where(apply, jnp.where(use_cutmix, mixed_cut, mixed_mix), images)
  return {**batch, "image": mixed.astype(images.dtype), "mix_label": batch["label"][::-1],
          "mix_lam": lam.astype(jnp.float32)}
