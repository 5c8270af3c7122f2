"""Segmentation end to end: real pet trimaps, training lowers the loss, main + predict."""
import json

import jax
import ml_collections
import numpy as np
import pytest
from PIL import Image

from tests.conftest import REPO, shared_data
from tlflax import data, optim, predict, steps, tasks, train
from tlflax.config import load_config_file


def tiny_pets_config(head="unet", total_steps=2):
  """The shipped config, shrunk: tiny random MobileNetV2, 64 px, two steps."""
  c = load_config_file(str(REPO / "configs" / "pets_segmentation.py") + f":{head}")
  c.data.root = str(shared_data("oxford_pets_subset"))
  c.model.pretrained = False
  c.model.kwargs = ml_collections.ConfigDict({"width_mult": 0.25})
  c.data.image_size = 64
  c.batch_size = 8
  c.eval_batch_size = 32
  c.total_steps = total_steps
  c.eval_every_steps = total_steps
  return c


@pytest.mark.parametrize("head", ["deeplabv3", "unet"])
def test_training_steps_lower_the_loss_on_real_masks(head):
  config = tiny_pets_config(head)
  config.optim.lr = 3e-3
  config.optim.schedule = "constant"
  config.optim.warmup_steps = 0
  pipe = data.build(config.data, batch_size=8, eval_batch_size=8, seed=0)
  module, variables = train.build_model(config, len(pipe.class_names))
  tx, labels, _ = optim.make(config.optim, variables["params"], 20)
  task = tasks.make(config)
  step = jax.jit(steps.make_train_step(module, tx, labels, task=task))
  state = steps.create_state(variables, tx)
  batch = next(pipe.train_batches())
  assert set(np.unique(batch["label"])) <= {0, 1, 255}
  losses = []
  for _ in range(12):  # The same real batch: the loss must fall clearly.
    state, sums = step(state, batch)
    losses.append(float(sums["loss"] / sums["count"]))
  assert losses[-1] < 0.7 * losses[0], losses


def test_main_writes_segmentation_metrics_and_predict_writes_masks(tmp_path):
  workdir = tmp_path / "run"
  summary = train.run(tiny_pets_config("deeplabv3"), str(workdir))
  assert {"eval/mIoU", "eval/pixel_accuracy", "eval/mDice", "eval/loss",
          "best/eval/mIoU"} <= set(summary)
  assert 0.0 <= summary["eval/mIoU"] <= 1.0 and summary["eval/num_examples"] == 60
  report = json.loads((workdir / "eval_report.json").read_text())
  assert set(report["per_class"]) == {"background", "pet"}
  assert np.asarray(report["confusion_matrix"]).shape == (2, 2)
  images = tmp_path / "images"
  images.mkdir()
  photo = shared_data("oxford_pets_subset") / "images" / "Abyssinian_175.jpg"
  (images / photo.name).write_bytes(photo.read_bytes())
  (images / "bad.png").write_bytes(b"")
  result = predict.predict(str(workdir), str(images), str(tmp_path / "out"), batch_size=4)
  assert result["task"] == "segmentation" and result["failed"] == 1
  mask = np.asarray(Image.open(tmp_path / "out" / "masks" / "Abyssinian_175.png"))
  original = Image.open(photo)
  assert mask.shape == (original.height, original.width) and mask.max() <= 1
  overlay = Image.open(tmp_path / "out" / "overlays" / "Abyssinian_175.png")
  assert overlay.size == original.size and overlay.mode == "RGB"
