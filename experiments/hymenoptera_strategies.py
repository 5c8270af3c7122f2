"""Which fine-tuning strategy transfers best to ants vs bees? MobileNetV2, ImageNet weights.

Command (from the repository root, with ../shared/data beside it; it resumes, so it may
span sessions: run the same command again):
  python -m tlflax.sweep experiments/hymenoptera_strategies.py --workdir workdirs
  python -m tlflax.sweep experiments/hymenoptera_strategies.py --dry_run   # plan only
Results: workdirs/hymenoptera_strategies/results.md (mean ± std over the three seeds per
strategy, transfer gain over the from-scratch baseline, plots).

Strategies (the argument of configs/hymenoptera.py; everything else is that config's
recipe: Adam 3e-4, warmup 15 steps, cosine, label smoothing 0.1, weight decay 1e-4,
batch 16, random resized crop 0.25-1 + flip, BatchNorm frozen where parameters are):
  linear        linear probe: only the new head trains (fixed feature extractor)
  last_stages   partial fine-tuning: features_7-18 + head train, features_0-6 frozen
  full          full fine-tuning: every layer trains
  scratch       the full recipe from random initialisation (`model.pretrained=False`),
                the baseline every strategy's `transfer_gain` is measured against
  gradual       gradual unfreezing: head first, then one more stage (top down) every
                2 epochs (30 steps), BatchNorm statistics frozen; one compiled step
Three seeds each (0, 1, 2): 15 runs; 15 epochs (225 steps) at 224 x 224 px, evaluated
on the 153 val images after every epoch; the final epoch is what counts.

Resolution and epochs, chosen to fit about 2 hours on the 2-core CPU. Timed here with
short runs of `python -m tlflax.main --config configs/hymenoptera.py:X
--config.total_steps=31` (2 epochs) while the machine was shared with other jobs (load
average 4-6): full fine-tuning at 224 px trains at ~12 images/s, 24 s per epoch with its
eval; the linear probe 7 s per epoch; last stages (timed at 160 px: 4x the images/s of
full) ~10 s per epoch at 224 px; about 15-45 s per run to start and compile. Estimate
per seed: linear 125 s + last_stages 165 s + full 405 s + scratch 405 s = 1100 s, so
~55 min for 12 runs, ~70 min with gradual unfreezing (3 more runs of about full's cost:
gated stages are differentiated from step 0 so that the step compiles once), which leaves room for a busier machine within ~2 h. On a quiet
machine expect about half. 160 px would save ~40% but leave the 224-px references
below (the README's single runs, torchvision's tutorial) incomparable.

Measured (all 15 runs, final-epoch val accuracy, mean +- sample std over seeds 0/1/2; best eval
in brackets; wall time per run; runs spread over two sessions on the shared 2-core CPU, load
average 4-13, 6913 s = 115 min in all; experiments/results/hymenoptera_strategies/):
  linear        0.959 +- 0.004  (0.959)   94 s     transfer gain +0.288
  last_stages   0.926 +- 0.010  (0.943)  196 s     +0.255
  full          0.919 +- 0.026  (0.941)  530 s     +0.248
  gradual       0.941 +- 0.007  (0.952)  909 s     +0.270
  scratch       0.671 +- 0.034  (0.695)  574 s     (baseline)
No negative transfer. The linear probe is best and steadiest; gradual unfreezing beats
full and last-stages fine-tuning at the final epoch and has the smallest spread of the
fine-tuning strategies, at the highest cost (it differentiates every gated stage from
step 0 so that the step compiles once).

Reference: torchvision's tutorial reaches 0.928 (full fine-tune) and 0.954 (fixed
feature extractor) with ResNet-18; README "Results" has the single-run tlflax numbers
(linear 0.961, torchvision's MobileNetV2 recipe 0.954 full / 0.961 fixed).
"""
BASE = "configs/hymenoptera.py"
SEEDS = [0, 1, 2]

STRATEGIES = [
    {"name": "linear", "config": f"{BASE}:linear"},
    {"name": "last_stages", "config": f"{BASE}:last_stages"},
    {"name": "full", "config": f"{BASE}:full"},
    {"name": "gradual", "config": f"{BASE}:gradual"},
]


def get_sweep():
  return {
      "base": f"{BASE}:linear",
      "runs": STRATEGIES,
      "grid": {"seed": SEEDS},
      # Stated explicitly (they are configs/hymenoptera.py's defaults too), so that the
      # timing estimate above stays true if that file's defaults change.
      "overrides": {"data.image_size": 224, "num_epochs": 15.0},
      # One shared scratch variant: the full fine-tuning recipe without ImageNet weights.
      "add_scratch_baseline": {"name": "scratch", "config": f"{BASE}:full"},
  }
