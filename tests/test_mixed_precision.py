"""bf16 compute (`config.model.dtype="bfloat16"`) for every task: float32 master weights,
float32 outputs, and a training loss that tracks float32 step by step.

Each task trains for 4 steps on the same real batches, once in float32 and once
in bf16, from the same float32 initial parameters: classification is the
quickstart (ImageNet MobileNetV2, last stages + head, 64 px, lr 0.005);
segmentation (U-Net) and detection (RetinaNet) are their tiny test configs
(random MobileNetV2 x0.25). The loss may differ by at most 3% (relative) at
every step. Measured on the 2-core CPU (jax 0.10.2), largest over the 4 steps:
classification 1.7%, segmentation 1.3%, detection 0.02% (printed with -s).

What bf16 cannot do, found on the way: BatchNorm with batch statistics on
1x1 or 2x2 maps (a random network at 32 px, stride 32 / 16) loses the
deviations from a channel's mean to bf16 rounding (around 5.0 its spacing is
0.03), so stride-32 features differed by 45% and the digits loss by 1.4-1.9% at
initialisation; eval mode (running statistics) stayed at 1%. Likewise a
learning rate that makes float32 training itself erratic (quickstart's 0.05
after a 2-step warm-up: loss 1.9 -> 7.6 in a step) turns rounding into 7%
loss differences. Use bf16 with images of at least 64 px (or frozen
BatchNorm) and a stable recipe.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import test_train_detection, test_train_segmentation
from tests.conftest import REPO, mobilenet_v2_weight_file
from tlflax import data, optim, steps, tasks, train
from tlflax.config import load_config_file

STEPS = 4
TOLERANCE = 0.03  # Relative, per step (see the module docstring).


def tiny_config(task):
  if task == "classification":  # The quickstart: ImageNet MobileNetV2, last stages + head.
    mobilenet_v2_weight_file()
    c = load_config_file(str(REPO / "configs" / "quickstart.py"))
    c.data.image_size, c.batch_size = 64, 16
    c.optim.lr, c.optim.warmup_steps, c.optim.schedule = 0.005, 0, "constant"
    return c
  if task == "segmentation":
    return test_train_segmentation.tiny_pets_config("unet")
  return test_train_detection.tiny_pets_config("retinanet")


def train_losses(config, dtype):
  """Losses of STEPS train steps, the final state, and one eval step's output."""
  config.model.dtype = dtype
  pipe = data.build(config.data, batch_size=config.batch_size,
                    eval_batch_size=config.eval_batch_size, seed=0)
  module, variables = train.build_model(config, len(pipe.class_names))
  tx, labels, _ = optim.make(config.optim, variables["params"], STEPS)
  task = tasks.make(config, module=module, pipe=pipe)
  step = jax.jit(steps.make_train_step(module, tx, labels, task=task))
  state = steps.create_state(variables, tx)
  losses = []
  for batch, _ in zip(pipe.train_batches(), range(STEPS)):
    state, sums = step(state, batch)
    losses.append(float(sums["loss"] / sums["count"]))
  eval_out = jax.jit(steps.make_eval_step(module, task))(state, next(pipe.eval_batches()))
  return np.array(losses), state, eval_out


@pytest.mark.parametrize("task", ["classification", "segmentation", "detection"])
def test_bfloat16_loss_tracks_float32(task):
  f32, state32, _ = train_losses(tiny_config(task), "float32")
  bf16, state16, eval16 = train_losses(tiny_config(task), "bfloat16")
  dtypes = {x.dtype for x in jax.tree_util.tree_leaves((state16.params, state16.model_state,
                                                        state16.opt_state))
            if jnp.issubdtype(x.dtype, jnp.floating)}
  assert dtypes == {np.dtype("float32")}  # Master weights, statistics, optimizer state.
  assert all(np.isfinite(x).all() for x in jax.tree_util.tree_leaves(eval16)
             if jnp.issubdtype(np.asarray(x).dtype, jnp.floating))
  relative = np.abs(bf16 - f32) / np.abs(f32)
  print(f"{task}: float32 losses {np.round(f32, 4).tolist()}, bf16 {np.round(bf16, 4).tolist()}, "
        f"max relative difference {relative.max():.2e}")
  assert relative.max() <= TOLERANCE, (f32, bf16)
  assert not np.array_equal(f32, bf16)  # bf16 really computed in bf16.
