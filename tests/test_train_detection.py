"""Detection end to end: real pet head boxes, training lowers the loss, main + predict."""
import json

import jax
import ml_collections
import numpy as np
import pytest

from tests.conftest import REPO, shared_data
from tlflax import data, optim, predict, steps, tasks, train
from tlflax.config import load_config_file


def tiny_pets_config(head="retinanet", total_steps=2):
  """The shipped config, shrunk: tiny random MobileNetV2, FPN width 16, 128 px."""
  c = load_config_file(str(REPO / "configs" / "pets_detection.py") + f":{head}")
  c.data.root = str(shared_data("oxford_pets_subset"))
  c.model.pretrained = False
  c.model.kwargs = ml_collections.ConfigDict({"width_mult": 0.25})
  c.detection.fpn_channels = 16
  c.data.image_size = 128
  c.data.max_boxes = 4
  c.batch_size = 4
  c.eval_batch_size = 20
  c.total_steps = total_steps
  c.eval_every_steps = total_steps
  return c


def test_detection_head_kwargs_reach_the_head():
  """The shipped RetinaNet recipe has GroupNorm towers (`config.detection.head_kwargs`)."""
  config = tiny_pets_config("retinanet")
  assert config.detection.head_kwargs.group_norm
  _, variables = train.create_module(config, 2)
  assert "norm_0" in variables["params"]["head"]["cls_tower"]
  config.detection.head_kwargs.group_norm = False
  _, variables = train.create_module(config, 2)
  assert "norm_0" not in variables["params"]["head"]["cls_tower"]


@pytest.mark.parametrize("head", ["retinanet", "fcos"])
def test_training_steps_lower_the_loss_on_real_boxes(head):
  config = tiny_pets_config(head)
  config.optim.lr = 5e-3
  config.optim.schedule = "constant"
  config.optim.warmup_steps = 0
  config.optim.rules = [(r"backbone/.*", "frozen"), (r".*", 1.0)]
  pipe = data.build(config.data, batch_size=4, eval_batch_size=4, seed=0)
  module, variables = train.build_model(config, len(pipe.class_names))
  tx, labels, _ = optim.make(config.optim, variables["params"], 30)
  task = tasks.make(config, module=module, pipe=pipe)
  step = jax.jit(steps.make_train_step(module, tx, labels, task=task))
  state = steps.create_state(variables, tx)
  batch = next(pipe.train_batches())
  assert (batch["classes"] >= 0).sum(1).min() >= 1  # Every pet photo has a head box.
  losses = []
  for _ in range(20):  # The same real batch: the loss must fall clearly.
    state, sums = step(state, batch)
    losses.append(float(sums["loss"] / sums["count"]))
  assert losses[-1] < 0.7 * losses[0], losses


def test_main_writes_coco_metrics_and_predict_writes_boxes(tmp_path):
  workdir = tmp_path / "run"
  config = tiny_pets_config()
  config.detection.score_threshold = 0.0  # An untrained model still yields boxes to check.
  summary = train.run(config, str(workdir))
  assert {"eval/AP", "eval/AP50", "eval/AP75", "eval/APs", "eval/APm", "eval/APl",
          "eval/AP/cat", "eval/AP/dog", "best/eval/AP"} <= set(summary)
  assert summary["eval/num_examples"] == 60 and summary["eval/num_detections"] > 0
  images = tmp_path / "images"
  images.mkdir()
  photo = shared_data("oxford_pets_subset") / "images" / "Abyssinian_175.jpg"
  (images / photo.name).write_bytes(photo.read_bytes())
  (images / "bad.jpg").write_bytes(b"\xff\xd8 truncated")
  result = predict.predict(str(workdir), str(images), str(tmp_path / "out"), draw=True)
  assert result["task"] == "detection" and result["failed"] == 1
  found = json.loads((tmp_path / "out" / "detections.json").read_text())
  from PIL import Image
  width, height = Image.open(photo).size
  boxes = np.array([d["box"] for d in found[str(images / photo.name)]["detections"]])
  assert len(boxes) and (boxes >= 0).all() and (boxes[:, [0, 2]] <= width).all()
  assert (boxes[:, [1, 3]] <= height).all()
  assert "error" in found[str(images / "bad.jpg")]
  assert Image.open(tmp_path / "out" / "drawn" / "Abyssinian_175.png").size == (width, height)
