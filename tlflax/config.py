"""The base experiment config: every field `train.run` reads, with its default.

Experiment files in `configs/` start from `base_config()` and change what they
need, so every field exists and `--config.a.b=VALUE` overrides type-check
(an unknown field is an error naming it).
"""
from __future__ import annotations

import ml_collections
from ml_collections import config_dict

from tlflax import data
from tlflax import early_stopping
from tlflax import mixup
from tlflax import distributed


def model_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.name = "mobilenet_v2"  # `tlflax.list_models()`.
  c.pretrained = True  # True (default ImageNet weight), a weight tag, a .pth path, or False.
  c.weights_dir = config_dict.placeholder(str)  # Extra folder searched for weight files.
  c.dtype = "float32"  # Compute dtype: float32 or bfloat16 (parameters stay float32).
  # BatchNorm in training: "train" (batch statistics, running averages updated),
  # "frozen" (running statistics everywhere), "follow_params" (frozen where the
  # layer's parameters are frozen by optim.rules, trained elsewhere).
  c.bn_mode = "follow_params"
  c.dropout = config_dict.placeholder(float)  # None: the architecture's default.
  c.kwargs = ml_collections.ConfigDict()  # Architecture options, e.g. width_mult.
  c.mean = config_dict.placeholder(tuple)  # None: the pretrained weight's mean/std.
  c.std = config_dict.placeholder(tuple)
  return c


def optim_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.name = "momentum"  # sgd, momentum, nesterov, rmsprop, adam, adamw.
  c.lr = 0.01
  c.momentum = 0.9
  c.weight_decay = 0.0  # Masked: kernels only, never norms and biases.
  c.b1, c.b2, c.eps = 0.9, 0.999, 1e-8
  c.rms_decay = 0.9
  c.schedule = "cosine"  # cosine, step, constant.
  c.warmup_steps = 0
  c.final_lr_fraction = 0.0  # Cosine ends at lr * this.
  c.step_boundaries = (0.5, 0.75)  # "step": fractions of the decay steps (or step numbers >= 1).
  c.decay_factor = 0.1
  c.grad_clip_norm = config_dict.placeholder(float)
  # (regex over parameter paths, lr multiplier or "frozen"); full match, first wins,
  # every parameter must be covered.
  c.rules = [(".*", 1.0)]
  # Stage strategies (`tlflax.strategies`, from the architecture's named stages); they
  # generate the rules, so leave `rules` at its default when using them.
  c.train_last_stages = config_dict.placeholder(int)  # Head + last N stages train; 0 = linear.
  c.layer_decay = config_dict.placeholder(float)  # Stage at depth d (0 = top): lr x decay^(d+1).
  # Gradual unfreezing, one compiled step: ((regex, first step or fraction of the run), ...);
  # first full match wins, unmatched parameters train from step 0.
  c.unfreeze = ()
  c.unfreeze_every = config_dict.placeholder(float)  # Or: one more stage (top first) every N
  c.unfreeze_start_trainable = 0  # steps (< 1: fraction); stages training from step 0.
  c.l1 = 0.0  # Penalties on kernels added to the gradient: l1 * sign(w), l2 * w.
  c.l2 = 0.0
  return c


def segmentation_config() -> ml_collections.ConfigDict:
  """Fields of `config.segmentation` (experiments with `task = "segmentation"` add it).

  `config.model` still names the backbone (`model.name`, `model.pretrained`:
  its ImageNet weight); the decoder and losses are chosen here.
  """
  c = ml_collections.ConfigDict()
  c.head = "deeplabv3"  # fcn, deeplabv3, unet (`tlflax.heads` registry).
  c.output_stride = config_dict.placeholder(int)  # 8/16 dilate the backbone; None: its own.
  c.aux = False  # FCN auxiliary head on the stride-16 map, training loss only.
  c.aux_weight = 0.5  # torchvision's reference recipe.
  c.ce_weight = 1.0  # Loss = ce_weight * cross-entropy + dice_weight * Dice.
  c.dice_weight = 0.0
  c.class_weights = config_dict.placeholder(tuple)  # Per-class CE weights; None: equal.
  return c


def detection_config() -> ml_collections.ConfigDict:
  """Fields of `config.detection` (experiments with `task = "detection"` add it).

  `config.model` names the backbone and its ImageNet weight; FPN levels come
  from its stride_8/16/32 maps.
  """
  c = ml_collections.ConfigDict()
  c.head = "retinanet"  # retinanet, fcos.
  c.fpn_channels = 256
  # Head fields (`tlflax.heads.DETECTION_HEADS`), e.g. group_norm=True: GroupNorm in
  # RetinaNet's towers (torchvision's v2; FCOS always has it).
  c.head_kwargs = ml_collections.ConfigDict()
  c.score_threshold = 0.05  # Eval / predict post-processing, as torchvision's defaults.
  c.iou_threshold = 0.5  # Per-class NMS.
  c.pre_nms_top_k = 1000
  c.max_detections = 100
  return c


def fewshot_config() -> ml_collections.ConfigDict:
  """`config.fewshot`: few-shot ridge evaluation during training (`tlflax.transfer.fewshot`)."""
  c = ml_collections.ConfigDict()
  c.every_steps = 0  # 0: off; else every N steps -> TensorBoard fewshot/*, DIR/fewshot.jsonl.
  c.shots = (1, 5, 10, 25)  # Training images per class.
  c.draws = 5  # Seeded support draws averaged per shot count.
  c.l2_reg = 1.0  # Ridge strength on L2-normalised, centred features.
  c.seed = 0  # Seed of the draws.
  c.batch_size = config_dict.placeholder(int)  # Feature batch; None: eval_batch_size.
  return c


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.task = "classification"  # classification, segmentation, detection (`tlflax.tasks.TASKS`).
  c.model = model_config()
  c.data = data.default_config()
  c.optim = optim_config()
  c.batch_size = 32  # Global, split over all devices and processes.
  c.eval_batch_size = 64
  c.num_epochs = 10.0
  c.total_steps = config_dict.placeholder(int)  # Overrides num_epochs when set.
  c.label_smoothing = 0.0
  c.mixup = mixup.default_config()  # Mixup / CutMix on device (classification).
  c.log_every_steps = 20
  c.eval_every_steps = config_dict.placeholder(int)  # None: once per epoch.
  c.checkpoint_every_steps = config_dict.placeholder(int)  # None: at every eval.
  c.keep_checkpoints = 2
  # Start from another run's weights (a workdir, its checkpoints/ or a step folder): params
  # and BatchNorm statistics, strictly; init_reinit (a regex such as 'params/head/.*') names
  # those re-initialised when their shapes differ. Not a resume: step and optimizer start fresh.
  c.init_from = config_dict.placeholder(str)
  c.init_reinit = config_dict.placeholder(str)
  c.fewshot = fewshot_config()  # Periodic few-shot evaluator; off by default.
  c.early_stopping = early_stopping.default_config()  # Patience on an eval metric; best kept.
  c.distributed = distributed.default_config()  # Multi-host start-up; None: auto-detect.
  return c


def check_field_path(config: ml_collections.ConfigDict, path: str) -> None:
  """Raises a ValueError naming an unknown dotted field and its close matches."""
  import difflib  # pylint: disable=g-import-not-at-top
  node, walked = config, []
  for part in path.split("."):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      known = list(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
      close = difflib.get_close_matches(part, known, n=3, cutoff=0.5)
      where = ".".join(walked) or "the config"
      hint = f" Did you mean: {', '.join('.'.join(walked + [c]) for c in close)}?" if close else ""
      raise ValueError(f"Unknown config field {path!r}: {where} has no field {part!r}.{hint} "
                       f"Fields there: {', '.join(sorted(known))}.")
    node, walked = node[part], walked + [part]


def load_config_file(spec: str) -> ml_collections.ConfigDict:
  """Loads `path/to/config.py[:ARG]` the way `--config` does."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  path, _, arg = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location("_tlflax_config", path)
  if module_spec is None:
    raise ValueError(f"Config file {path!r} cannot be loaded (does it exist, ending in .py?).")
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def check_overrides(argv) -> None:
  """Exits, with close matches, on `--config.x.y=...` naming no field.

  For every command taking `--config` (main, fewshot, episodic, rank): ml_collections would
  otherwise raise a bare `AttributeError: 'y'` from inside flag parsing.
  """
  import sys  # pylint: disable=g-import-not-at-top
  spec = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
  if spec is None and "--config" in argv[:-1]:
    spec = argv[argv.index("--config") + 1]
  paths = [a[len("--config."):].split("=", 1)[0] for a in argv if a.startswith("--config.")]
  if spec is None or not paths:
    return
  config = load_config_file(spec)
  for path in paths:
    try:
      check_field_path(config, path)
    except ValueError as e:
      sys.exit(f"Error: {e}")
