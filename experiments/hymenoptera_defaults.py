"""How `configs/hymenoptera.py`'s default recipe is chosen: a search scored on a holdout.

The published figure of a config is its val accuracy, so the recipe must not be picked on val.
This search scores each trial on a seeded, class-stratified 30% of the train folder (73 of 244
images, `search.holdout_fraction`), trains on the other 70%, and then retrains the best recipe
once on all of train and scores it on val once (`final_run`).

Command (from the repository root, with ../shared/data beside it; it resumes):
  python -m tlflax.sweep experiments/hymenoptera_defaults.py --workdir workdirs
Results: workdirs/hymenoptera_defaults/results.md, best_config.py, and the final run.

The space is the linear probe's (the shipped default strategy): the optimizer, its learning
rate, label smoothing and the random-resized-crop scale. The starting point is the recipe the
config shipped with before (Adam 3e-4, label smoothing 0.1, crop 0.25-1), so the search can only
keep it or find one the holdout prefers.
"""


def get_sweep():
  return {
      "base": "configs/hymenoptera.py:linear",
      "search": {
          "space": {
              "optim.name": ("choice", ["adam", "sgd"]),
              "optim.lr": ("log_uniform", 1e-4, 3e-2),
              "label_smoothing": ("choice", [0.0, 0.1]),
              "data.crop_scale": ("choice", [(0.08, 1.0), (0.25, 1.0), (0.5, 1.0)]),
          },
          "method": "tpe", "num_trials": 16, "seed": 0, "pruner": None,
          "selection": "holdout", "holdout_fraction": 0.3,
          "start": [{"optim.name": "adam", "optim.lr": 3e-4, "label_smoothing": 0.1,
                     "data.crop_scale": (0.25, 1.0)}],
      },
  }
