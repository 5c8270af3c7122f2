"""Determinism: the same config and seed on the same machine gives identical results.

Two runs of the real command (separate processes, different PYTHONHASHSEED, so
nothing may hang on set or dict-of-hash ordering) on a tiny digits config with
random-resized-crop and flip augmentation, dropout and BatchNorm in train mode:
metrics.jsonl and summary.json must be byte-identical and every checkpoint's
parameters and statistics bit-identical. The workdir must also record the seed
and every effective value: config.json has every field of the base config, and
run_info.json the values resolved at run time (total_steps, cadences, weight).
"""
import json
import textwrap

import ml_collections
import numpy as np

from tests.test_distributed import saved_state, start, wait_all
from tlflax.config import base_config

CONFIG = textwrap.dedent("""
    from tests.tiny import tiny_digits_config

    def get_config():
      c = tiny_digits_config(4)
      c.seed = 7
      c.model.dropout = 0.3
      c.log_every_steps = 1
      return c
""")


def leaf_paths(config: ml_collections.ConfigDict, prefix=""):
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      yield from leaf_paths(value, f"{prefix}{key}.")
    else:
      yield f"{prefix}{key}"


def json_has(tree, path: str) -> bool:
  for part in path.split("."):
    if not isinstance(tree, dict) or part not in tree:
      return False
    tree = tree[part]
  return True


def test_same_config_and_seed_give_identical_runs(tmp_path):
  config_file = tmp_path / "tiny.py"
  config_file.write_text(CONFIG)
  runs = [tmp_path / "a", tmp_path / "b"]
  wait_all([start(config_file, d, tmp_path / f"{d.name}.log", extra_env={"PYTHONHASHSEED": s})
            for d, s in zip(runs, ("1", "2"))])
  a, b = runs
  for name in ("metrics.jsonl", "summary.json", "config.json"):
    assert (a / name).read_bytes() == (b / name).read_bytes(), name
  assert [json.loads(l)["step"] for l in (a / "metrics.jsonl").read_text().splitlines()] == [2, 4]
  for step in (2, 4):
    sa, sb = saved_state(a, step), saved_state(b, step)
    assert sa.keys() == sb.keys()
    different = [k for k in sa if sa[k].tobytes() != sb[k].tobytes()]
    assert not different, (step, different[:5])
  moved = saved_state(a, 2)
  assert any(not np.array_equal(moved[k], sa[k]) for k in sa)  # Steps 3-4 changed something.
  info_a, info_b = (json.loads((d / "run_info.json").read_text()) for d in runs)
  assert info_a["effective"] == info_b["effective"]

  # Every field, the seed included, is in config.json; run-time values in run_info.json.
  saved = json.loads((a / "config.json").read_text())
  missing = [p for p in leaf_paths(base_config()) if not json_has(saved, p)]
  assert not missing, missing
  assert saved["seed"] == 7 and saved["model"]["dropout"] == 0.3
  effective = info_a["effective"]
  assert effective["seed"] == 7 and effective["total_steps"] == 4
  assert effective["eval_every_steps"] == 2 and effective["checkpoint_every_steps"] == 2
  assert effective["steps_per_epoch"] == 1437 // 16 and effective["num_eval"] == 360
  assert effective["pretrained_weight"] is None and effective["compute_dtype"] == "float32"
  assert effective["process_count"] == 1 and effective["local_batch_size"] == 16
