"""Transferability scores of frozen features: LogME, LEEP, k-NN and ridge-probe accuracy.

All take numpy arrays and compute in float64 on the host: the problems are
small (one row per training image, at most a few thousand columns) and the
closed forms need the precision more than the speed.

  logme(features, labels)             You et al., ICML 2021: mean over classes of
                                      the maximised log evidence of a Bayesian
                                      linear regression onto the one-hot target,
                                      divided by n. Higher is better; no labels of
                                      the source task are needed.
  leep(source_probs, labels)          Nguyen et al., ICML 2020: log of the expected
                                      empirical prediction, through the empirical
                                      joint of source labels (ImageNet classes) and
                                      target labels. Needs the source classifier.
  knn_accuracy(train, val, k)         cosine k-NN vote accuracy on val.
  ridge_accuracy(train, val)          closed-form ridge regression onto one-hot
                                      targets (the linear probe), its strength
                                      chosen by exact leave-one-out on train.
"""
from __future__ import annotations

from typing import Dict, Sequence, Tuple

import numpy as np


def _check_labels(labels: np.ndarray, n: int, what: str) -> np.ndarray:
  labels = np.asarray(labels)
  if labels.ndim != 1 or len(labels) != n:
    raise ValueError(f"{what}: labels must be a vector of {n} class indices (one per row), "
                     f"got shape {labels.shape}.")
  if labels.size and labels.min() < 0:
    raise ValueError(f"{what}: labels must be class indices >= 0, got {labels.min()}.")
  return labels.astype(np.int64)


def _as_matrix(features: np.ndarray, what: str) -> np.ndarray:
  x = np.asarray(features, np.float64)
  if x.ndim != 2:
    raise ValueError(f"{what}: features must be [n, dim], got shape {x.shape}; pool the feature "
                     "map first (tlflax.transfer.features).")
  if not np.all(np.isfinite(x)):
    raise ValueError(f"{what}: features contain NaN or inf (a diverged or badly scaled model?).")
  return x


# ---------------------------------------------------------------------------- LogME


def log_evidence(singular: np.ndarray, proj: np.ndarray, y_sq: float, n: int, dim: int,
                 alpha: float, beta: float) -> Tuple[float, float, float, float]:
  """Log evidence of y under w ~ N(0, 1/alpha I), y | F, w ~ N(F w, 1/beta I).

  Works in the SVD F = U S V^T: `singular` = S (r values), `proj` = U^T y,
  `y_sq` = ||y||^2. Returns (evidence, gamma, ||m||^2, ||y - F m||^2), where m is
  the posterior mean and gamma the effective number of parameters; these are
  what the fixed-point updates of alpha and beta need.
  """
  sigma = singular ** 2  # Non-zero eigenvalues of F^T F; the other dim - r are zero.
  lam = alpha / beta
  m_sq = float(np.sum((singular * proj / (lam + sigma)) ** 2))
  residual = float(y_sq - np.sum(proj ** 2) + np.sum((lam * proj / (lam + sigma)) ** 2))
  residual = max(residual, 0.0)
  gamma = float(np.sum(sigma / (lam + sigma)))
  log_det = float(np.sum(np.log(alpha + beta * sigma)) + (dim - len(sigma)) * np.log(alpha))
  evidence = (dim / 2 * np.log(alpha) + n / 2 * np.log(beta) - alpha / 2 * m_sq
              - beta / 2 * residual - log_det / 2 - n / 2 * np.log(2 * np.pi))
  return float(evidence), gamma, m_sq, residual


def max_evidence(singular: np.ndarray, proj: np.ndarray, y_sq: float, n: int, dim: int,
                 max_iter: int = 100, tol: float = 1e-8) -> Tuple[float, float, float]:
  """(evidence / n, alpha, beta) at the fixed point of MacKay's updates (LogME's Algorithm 1).

  alpha = gamma / ||m||^2 and beta = (n - gamma) / ||y - F m||^2 are the
  stationarity conditions of the evidence; iterating them from alpha = beta = 1
  converges in a handful of steps. The paper stops at a 1% change of
  alpha / beta; a tighter tolerance costs little and makes the score independent
  of the starting point.
  """
  alpha, beta = 1.0, 1.0
  tiny = 1e-12
  for _ in range(max_iter):
    _, gamma, m_sq, residual = log_evidence(singular, proj, y_sq, n, dim, alpha, beta)
    new_alpha = gamma / max(m_sq, tiny)
    new_beta = (n - gamma) / max(residual, tiny)
    new_alpha, new_beta = max(new_alpha, tiny), max(new_beta, tiny)
    done = abs(new_alpha / new_beta - alpha / beta) <= tol * (alpha / beta)
    alpha, beta = new_alpha, new_beta
    if done:
      break
  evidence = log_evidence(singular, proj, y_sq, n, dim, alpha, beta)[0]
  return evidence / n, alpha, beta


def logme(features: np.ndarray, labels: np.ndarray, num_classes: int = None) -> float:
  """LogME of `features` [n, dim] for class `labels` [n]: mean over classes of the
  per-class (one-hot column) maximised log evidence, divided by n. Higher is better.

  The features are used as given (no centring or scaling), as in the paper's
  reference implementation; one SVD serves every class.
  """
  x = _as_matrix(features, "logme")
  labels = _check_labels(labels, len(x), "logme")
  num_classes = int(num_classes or labels.max() + 1)
  u, singular, _ = np.linalg.svd(x, full_matrices=False)
  scores = []
  for c in range(num_classes):
    y = (labels == c).astype(np.float64)
    proj = u.T @ y
    scores.append(max_evidence(singular, proj, float(y @ y), len(x), x.shape[1])[0])
  return float(np.mean(scores))


# ---------------------------------------------------------------------------- LEEP


def leep(source_probs: np.ndarray, labels: np.ndarray, num_classes: int = None) -> float:
  """LEEP of a source classifier's probabilities `source_probs` [n, Z] for target `labels`.

  Empirical joint P(y, z) = 1/n sum_i theta_i(z) [y_i = y]; conditional
  P(y | z) = P(y, z) / P(z); LEEP = 1/n sum_i log sum_z P(y_i | z) theta_i(z).
  It is <= 0; closer to 0 means the source labels predict the target better.
  """
  probs = _as_matrix(source_probs, "leep")
  if np.any(probs < 0) or not np.allclose(probs.sum(1), 1.0, atol=1e-3):
    raise ValueError("leep: source_probs must be probabilities (rows >= 0 summing to 1); pass "
                     "softmax(logits), not the logits.")
  labels = _check_labels(labels, len(probs), "leep")
  num_classes = int(num_classes or labels.max() + 1)
  onehot = np.eye(num_classes)[labels]  # [n, C]
  joint = onehot.T @ probs / len(probs)  # [C, Z]
  marginal = joint.sum(0, keepdims=True)  # [1, Z]
  conditional = joint / np.maximum(marginal, 1e-300)  # P(y | z)
  eep = np.sum(probs * conditional[labels], axis=1)  # sum_z theta_i(z) P(y_i | z)
  return float(np.mean(np.log(np.maximum(eep, 1e-300))))


# ---------------------------------------------------------------------------- k-NN


def knn_predict(train: np.ndarray, train_labels: np.ndarray, query: np.ndarray, k: int = 5,
                num_classes: int = None) -> np.ndarray:
  """Majority vote of the k most cosine-similar training rows (ties: the class whose
  voters are more similar in total)."""
  train, query = _as_matrix(train, "knn"), _as_matrix(query, "knn")
  train_labels = _check_labels(train_labels, len(train), "knn")
  num_classes = int(num_classes or train_labels.max() + 1)
  if not 1 <= int(k) <= len(train):
    raise ValueError(f"knn: k={k} must be between 1 and the {len(train)} training rows.")
  k = int(k)
  sims = _unit(query) @ _unit(train).T
  nearest = np.argpartition(-sims, k - 1, axis=1)[:, :k]
  near_sims = np.take_along_axis(sims, nearest, axis=1)
  votes = np.zeros((len(query), num_classes))
  closeness = np.zeros((len(query), num_classes))
  rows = np.repeat(np.arange(len(query)), k)
  np.add.at(votes, (rows, train_labels[nearest].reshape(-1)), 1.0)
  np.add.at(closeness, (rows, train_labels[nearest].reshape(-1)), near_sims.reshape(-1))
  return np.argmax(votes + 1e-6 * closeness / k, axis=1)


def _unit(x: np.ndarray) -> np.ndarray:
  return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def knn_accuracy(train: np.ndarray, train_labels: np.ndarray, val: np.ndarray,
                 val_labels: np.ndarray, k: int = 5, num_classes: int = None) -> float:
  predicted = knn_predict(train, train_labels, val, k, num_classes)
  return float(np.mean(predicted == _check_labels(val_labels, len(val), "knn")))


# ---------------------------------------------------------------------------- ridge probe

RIDGE_GRID = tuple(10.0 ** p for p in range(-4, 4))  # Per-example l2 strengths tried.


class RidgeProbe:
  """Ridge regression of standardised features onto one-hot targets, with intercept.

  Minimises ||X W + b - Y||^2 + lam ||W||^2 over W, b. X is z-scored with the
  training mean/std so one grid of strengths suits any backbone's feature scale;
  `lam` is picked from `l2_grid` (times n) by the exact leave-one-out accuracy
  on train (the hat-matrix identity: no refits).
  """

  def __init__(self, l2_grid: Sequence[float] = RIDGE_GRID):
    self.l2_grid = tuple(l2_grid)

  def fit(self, x: np.ndarray, labels: np.ndarray, num_classes: int = None) -> "RidgeProbe":
    x = _as_matrix(x, "ridge")
    labels = _check_labels(labels, len(x), "ridge")
    num_classes = int(num_classes or labels.max() + 1)
    self.mean = x.mean(0)
    self.scale = np.maximum(x.std(0), 1e-8)
    z = (x - self.mean) / self.scale
    targets = np.eye(num_classes)[labels]
    self.target_mean = targets.mean(0)
    u, s, vt = np.linalg.svd(z, full_matrices=False)
    proj = u.T @ (targets - self.target_mean)
    self.loo = {lam: loo_accuracy(u, s, proj, targets, self.target_mean, labels, lam * len(x))
                for lam in self.l2_grid}
    self.l2 = max(self.l2_grid, key=lambda lam: (self.loo[lam], lam))  # Ties: stronger.
    lam = self.l2 * len(x)
    self.weights = vt.T @ (proj * (s / (s ** 2 + lam))[:, None])
    return self

  def predict(self, x: np.ndarray) -> np.ndarray:
    z = (_as_matrix(x, "ridge") - self.mean) / self.scale
    return np.argmax(z @ self.weights + self.target_mean, axis=1)


def loo_accuracy(u, s, proj, targets, target_mean, labels, lam) -> float:
  """Leave-one-out accuracy of ridge (with intercept) from one SVD of the centred data:
  prediction without row i = (fit_i - h_ii y_i) / (1 - h_ii), h = centred hat + 1/n."""
  n = len(targets)
  shrink = s ** 2 / (s ** 2 + lam)
  fitted = u @ (proj * shrink[:, None]) + target_mean
  hat = np.sum(u ** 2 * shrink, axis=1) + 1.0 / n
  loo = (fitted - hat[:, None] * targets) / np.maximum(1.0 - hat, 1e-12)[:, None]
  return float(np.mean(np.argmax(loo, axis=1) == labels))


def ridge_accuracy(train: np.ndarray, train_labels: np.ndarray, val: np.ndarray,
                   val_labels: np.ndarray, num_classes: int = None) -> float:
  probe = RidgeProbe().fit(train, train_labels, num_classes)
  return float(np.mean(probe.predict(val) == _check_labels(val_labels, len(val), "ridge")))


# ---------------------------------------------------------------------------- all at once


def score_all(train: np.ndarray, train_labels: np.ndarray, val: np.ndarray,
              val_labels: np.ndarray, num_classes: int, source_probs: np.ndarray = None,
              k: int = 5) -> Dict[str, float]:
  """Every score of one candidate: LogME (train), LEEP (train, if `source_probs`),
  k-NN and ridge accuracy (fit on train, measured on val)."""
  result = {"logme": logme(train, train_labels, num_classes),
            "leep": float("nan"),
            "knn_acc": knn_accuracy(train, train_labels, val, val_labels, k, num_classes),
            "ridge_acc": ridge_accuracy(train, train_labels, val, val_labels, num_classes)}
  if source_probs is not None:
    result["leep"] = leep(source_probs, train_labels, num_classes)
  return result
