"""Meta-transfer: episodic N-way K-shot fine-tuning with a prototypical head, and its evaluation.

A pretrained backbone knows ImageNet; few-shot use asks it to separate new
classes from a handful of images. Episodic fine-tuning (Snell et al.'s
prototypical networks, with the cosine head and learnable scale of Chen et al.,
"A Closer Look at Few-shot Classification", 2019) trains on exactly that task,
over and over, on base classes, and is measured on novel classes it never saw:

  classes:  `class_split(num_classes, base, novel)`: disjoint class indices
  episode:  `EpisodeSampler(labels, classes, way, shot, query, key)`: `way`
            classes drawn from its own class set only, `shot` support and
            `query` query images of each, all distinct; a pure function of
            (key, episode number). Episode label = position of the class.
  head:     prototype of a class = mean of its L2-normalised support features,
            normalised; logits = scale * cosine(query feature, prototype),
            scale = exp(params["proto"]["log_scale"]) learnt with the backbone
  loss:     cross-entropy of the query logits; the train step is jit-compiled
            once (way, shot and query are static shapes)
  metric:   mean query accuracy over evaluation episodes, with the 95%
            confidence interval 1.96 * std / sqrt(episodes) (std with ddof=0)

BatchNorm uses its running statistics throughout (train=False): episodes are
small and the ImageNet statistics are what the frozen baseline sees too. The
parameters that train are chosen by `optim.rules`, as for ordinary fine-tuning.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import ml_collections
import numpy as np

from tlflax.transfer import fewshot

TRAIN_STREAM, EVAL_STREAM = 0, 1  # Sampler key parts, so the two never share episodes.


def episodic_config() -> ml_collections.ConfigDict:
  """`config.episodic`: the fields `python -m tlflax.episodic` reads, with defaults."""
  from tlflax.config import optim_config  # pylint: disable=g-import-not-at-top
  c = ml_collections.ConfigDict()
  c.base_classes = (0, 1, 2, 3, 4)  # Class indices of the training episodes.
  c.novel_classes = (5, 6, 7, 8, 9)  # Class indices of the evaluation episodes; disjoint.
  c.way = 5
  c.train_shot = 5
  c.query = 15  # Query images per class, training and evaluation.
  c.train_episodes = 300
  c.eval_shots = (1, 5)
  c.eval_episodes = 600
  c.init_scale = 10.0  # Initial cosine scale (inverse temperature).
  c.seed = 0
  c.optim = optim_config()
  c.optim.name = "adam"
  c.optim.lr = 1e-4
  c.optim.schedule = "cosine"
  c.optim.warmup_steps = 20
  c.optim.rules = [(r"proto/.*", 100.0),  # The scale moves on its own, larger scale.
                   (r"backbone/features_(1[4-8])/.*", 1.0),
                   (r".*", "frozen")]
  return c


# ---------------------------------------------------------------------------
# Classes and episodes.

def class_split(num_classes: int, base: Sequence[int], novel: Sequence[int]
                ) -> Tuple[Tuple[int, ...], Tuple[int, ...]]:
  """Checked (base, novel) class indices: in range, distinct, disjoint."""
  base, novel = tuple(int(c) for c in base), tuple(int(c) for c in novel)
  for name, classes in (("base_classes", base), ("novel_classes", novel)):
    if not classes or len(set(classes)) != len(classes):
      raise ValueError(f"episodic.{name}={classes} must be a non-empty list of distinct "
                       "class indices.")
    outside = [c for c in classes if not 0 <= c < num_classes]
    if outside:
      raise ValueError(f"episodic.{name} has {outside}, outside the dataset's classes "
                       f"0..{num_classes - 1}.")
  shared = sorted(set(base) & set(novel))
  if shared:
    raise ValueError(f"Classes {shared} are both base and novel: the evaluation would see "
                     "classes trained on. Make episodic.base_classes and novel_classes disjoint.")
  return base, novel


class EpisodeSampler:
  """N-way K-shot episodes over one class set (base or novel), never any other class."""

  def __init__(self, labels: np.ndarray, classes: Sequence[int], way: int, shot: int,
               query: int, key: Sequence[int]):
    self.labels = np.asarray(labels)
    self.classes = np.asarray(sorted(int(c) for c in classes))
    self.way, self.shot, self.query, self.key = int(way), int(shot), int(query), tuple(key)
    if not 1 < self.way <= len(self.classes):
      raise ValueError(f"way={way} needs 2..{len(self.classes)} (the classes of this split: "
                       f"{self.classes.tolist()}).")
    if self.shot < 1 or self.query < 1:
      raise ValueError(f"shot={shot} and query={query} must be >= 1.")
    self.by_class = {c: np.flatnonzero(self.labels == c) for c in self.classes.tolist()}
    short = {c: len(v) for c, v in self.by_class.items() if len(v) < self.shot + self.query}
    if short:
      raise ValueError(f"Classes {short} (images each) have fewer than shot + query = "
                       f"{self.shot + self.query} images; lower shot or query.")

  def episode(self, number: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(support [way * shot], query [way * query] indices, classes [way]), grouped by class."""
    rng = np.random.default_rng([*self.key, int(number)])
    classes = rng.choice(self.classes, size=self.way, replace=False)
    support, query = [], []
    for c in classes.tolist():
      picked = rng.choice(self.by_class[c], size=self.shot + self.query, replace=False)
      support.append(picked[:self.shot])
      query.append(picked[self.shot:])
    return np.concatenate(support), np.concatenate(query), classes


def mean_ci95(accuracies: Sequence[float]) -> Tuple[float, float]:
  a = np.asarray(accuracies, np.float64)
  return float(a.mean()), float(1.96 * a.std() / math.sqrt(len(a)))


# ---------------------------------------------------------------------------
# Classifiers of one episode, on features (numpy): the evaluation side.

def prototype_logits(support: np.ndarray, query: np.ndarray, way: int,
                     scale: float = 1.0) -> np.ndarray:
  """scale * cosine(query, normalised mean of each class's normalised support features)."""
  s = fewshot.l2_normalise(support).reshape(way, -1, support.shape[-1]).mean(1)
  return scale * fewshot.l2_normalise(query) @ fewshot.l2_normalise(s).T


def episode_accuracy(features: np.ndarray, sampler: EpisodeSampler, number: int,
                     method: str, l2_reg: float = fewshot.DEFAULT_L2_REG) -> float:
  """Query accuracy of one episode by `method` ("prototype" or "ridge") on given features."""
  support, query, _ = sampler.episode(number)
  s_y = np.repeat(np.arange(sampler.way), sampler.shot)
  q_y = np.repeat(np.arange(sampler.way), sampler.query)
  if method == "prototype":
    scores = prototype_logits(features[support], features[query], sampler.way)
  elif method == "ridge":
    scores = fewshot.ridge_scores(fewshot.ridge_fit(features[support], s_y, sampler.way, l2_reg),
                                  features[query])
  else:
    raise ValueError(f"method={method!r}: use 'prototype' or 'ridge'.")
  return float(np.mean(scores.argmax(-1) == q_y))


def evaluate(features: np.ndarray, sampler: EpisodeSampler, episodes: int, method: str,
             l2_reg: float = fewshot.DEFAULT_L2_REG) -> np.ndarray:
  """Per-episode query accuracies of episodes 0..episodes-1 of `sampler`."""
  return np.array([episode_accuracy(features, sampler, e, method, l2_reg)
                   for e in range(episodes)])


# ---------------------------------------------------------------------------
# Episodic training (JAX).

def _split(params, labels):
  """(trainable, frozen) flat dicts, by the optimizer's group labels."""
  import flax  # pylint: disable=g-import-not-at-top
  from tlflax.optim import FROZEN  # pylint: disable=g-import-not-at-top
  flat = flax.traverse_util.flatten_dict(params)
  flat_labels = flax.traverse_util.flatten_dict(labels)
  trainable = {k: v for k, v in flat.items() if flat_labels[k] != FROZEN}
  return trainable, {k: v for k, v in flat.items() if flat_labels[k] == FROZEN}


def proto_loss(module, params, model_state, support, query, way: int, shot: int, n_query: int):
  """(mean query cross-entropy, query accuracy) of one episode, support/query grouped by class."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  model_params = {k: v for k, v in params.items() if k != "proto"}
  x = jnp.concatenate([support, query])
  f = module.apply({"params": model_params, **model_state}, x, method=fewshot.pooled_features)
  f = f / jnp.maximum(jnp.linalg.norm(f, axis=-1, keepdims=True), 1e-12)
  protos = f[:way * shot].reshape(way, shot, -1).mean(1)
  protos = protos / jnp.maximum(jnp.linalg.norm(protos, axis=-1, keepdims=True), 1e-12)
  logits = jnp.exp(params["proto"]["log_scale"]) * f[way * shot:] @ protos.T
  y = jnp.repeat(jnp.arange(way), n_query)
  loss = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1))
  return loss, jnp.mean(logits.argmax(-1) == y)


class EpisodicTrainer:
  """Holds params + optimizer state; `step(support, query)` is one jit-compiled update.

  `traces` counts how often the step was traced: it stays 1 for a whole run.
  """

  def __init__(self, module, variables, optim_config, way: int, shot: int, query: int,
               total_episodes: int, init_scale: float = 10.0):
    import jax  # pylint: disable=g-import-not-at-top
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    from tlflax import optim  # pylint: disable=g-import-not-at-top
    self.module, self.way, self.shot, self.query = module, int(way), int(shot), int(query)
    # Copies: the step donates its buffers, and the caller's variables must stay usable.
    self.params = jax.tree_util.tree_map(jnp.array, {
        **variables["params"],
        "proto": {"log_scale": jnp.asarray(math.log(init_scale), jnp.float32)}})
    self.model_state = {k: v for k, v in variables.items() if k != "params"}
    self.tx, self.labels, self.schedule = optim.make(optim_config, self.params, total_episodes)
    self.opt_state = self.tx.init(self.params)
    self.traces = 0
    self._step = jax.jit(self._update, donate_argnums=(0, 1))

  def _update(self, params, opt_state, support, query):
    import flax  # pylint: disable=g-import-not-at-top
    import jax  # pylint: disable=g-import-not-at-top
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    self.traces += 1
    trainable, frozen = _split(params, self.labels)

    def loss_of(flat):
      full = flax.traverse_util.unflatten_dict({**frozen, **flat})
      return proto_loss(self.module, full, self.model_state, support, query, self.way,
                        self.shot, self.query)

    (loss, acc), grads = jax.value_and_grad(loss_of, has_aux=True)(trainable)
    full_grads = flax.traverse_util.unflatten_dict(
        {**{k: jnp.zeros_like(v) for k, v in frozen.items()}, **grads})
    updates, opt_state = self.tx.update(full_grads, opt_state, params)
    updates = flax.traverse_util.flatten_dict(updates)
    new = {k: (v + updates[k]).astype(v.dtype) for k, v in trainable.items()}
    return flax.traverse_util.unflatten_dict({**frozen, **new}), opt_state, loss, acc

  def step(self, support: np.ndarray, query: np.ndarray) -> Tuple[float, float]:
    """One update on an episode; returns its (loss, query accuracy) before the update."""
    self.params, self.opt_state, loss, acc = self._step(self.params, self.opt_state,
                                                        support, query)
    return float(loss), float(acc)

  @property
  def scale(self) -> float:
    return float(np.exp(np.asarray(self.params["proto"]["log_scale"])))

  def variables(self) -> Dict:
    """The backbone's variables as the model reads them (without the head's scale)."""
    return {"params": {k: v for k, v in self.params.items() if k != "proto"}, **self.model_state}

  def train(self, images: np.ndarray, sampler: EpisodeSampler, episodes: int,
            log: Optional[Callable[[int, float, float], None]] = None) -> List[Tuple[float, float]]:
    """`episodes` updates on episodes of `sampler` over the preprocessed `images`."""
    if (sampler.way, sampler.shot, sampler.query) != (self.way, self.shot, self.query):
      raise ValueError(f"The sampler's (way, shot, query)=({sampler.way}, {sampler.shot}, "
                       f"{sampler.query}) differ from the trainer's ({self.way}, {self.shot}, "
                       f"{self.query}).")
    history = []
    for e in range(episodes):
      support, query, _ = sampler.episode(e)
      history.append(self.step(images[support], images[query]))
      if log is not None:
        log(e, *history[-1])
    return history


def features_of(module, variables, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
  """float32 [N, D] pooled features of preprocessed images, in fixed-size batches."""
  fn = fewshot.feature_function(module)
  out = []
  for i in range(0, len(images), batch_size):
    batch = images[i:i + batch_size]
    pad = batch_size - len(batch)
    if pad:
      batch = np.concatenate([batch, np.zeros((pad,) + batch.shape[1:], batch.dtype)])
    out.append(np.asarray(fn(variables, batch))[:batch_size - pad])
  return np.concatenate(out)


def class_pool(pipe, splits: Sequence[str], classes: Sequence[int], mean, std,
               batch_size: int = 64) -> Tuple[np.ndarray, np.ndarray]:
  """(preprocessed images, labels) of every example of `classes` in `splits`, eval transform."""
  images, labels = [], []
  for split in splits:
    split_y = fewshot.split_labels(pipe, split)
    idx = np.flatnonzero(np.isin(split_y, list(classes)))
    if not len(idx):
      continue
    batches = list(fewshot.eval_images(pipe, split, idx, mean, std, batch_size))
    images.append(np.concatenate(batches)[:len(idx)])
    labels.append(split_y[idx])
  if not images:
    raise ValueError(f"No images of classes {list(classes)} in splits {list(splits)}.")
  return np.concatenate(images), np.concatenate(labels)
