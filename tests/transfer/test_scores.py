"""Transferability scores against slow, obviously-correct references and known answers."""
import numpy as np
import pytest
from scipy import optimize, stats

from tlflax.transfer import scores


def _problem(seed, n=40, dim=6, num_classes=3):
  rng = np.random.default_rng(seed)
  labels = np.arange(n) % num_classes
  rng.shuffle(labels)
  features = rng.normal(size=(n, dim)) + 0.8 * rng.normal(size=(num_classes, dim))[labels]
  return features, labels


def _separable_and_noise(seed, n=60, dim=8, num_classes=3):
  """Features whose class means are far apart (tiny spread) vs. pure noise."""
  rng = np.random.default_rng(seed)
  labels = np.arange(n) % num_classes
  centres = 5.0 * rng.normal(size=(num_classes, dim))
  separable = centres[labels] + 0.1 * rng.normal(size=(n, dim))
  noise = rng.normal(size=(n, dim))
  return separable, noise, labels


# ---------------------------------------------------------------------------- LogME


def reference_evidence(features, y, alpha, beta):
  """log p(y | alpha, beta) straight from the marginal: y ~ N(0, I/beta + F F^T / alpha)."""
  cov = np.eye(len(y)) / beta + features @ features.T / alpha
  return stats.multivariate_normal(mean=np.zeros(len(y)), cov=cov).logpdf(y)


def reference_logme(features, labels, num_classes):
  """Mean over classes of max_{alpha, beta} log evidence / n, by numerical optimisation."""
  per_class = []
  for c in range(num_classes):
    y = (labels == c).astype(np.float64)
    best = -np.inf
    for start in ((0.0, 0.0), (3.0, 1.0), (-3.0, 2.0)):
      found = optimize.minimize(lambda p: -reference_evidence(features, y, *np.exp(p)), start,
                                method="Nelder-Mead",
                                options={"xatol": 1e-9, "fatol": 1e-12, "maxiter": 4000})
      best = max(best, -found.fun)
    per_class.append(best / len(y))
  return float(np.mean(per_class))


@pytest.mark.parametrize("seed,n,dim", [(0, 30, 5), (1, 25, 40), (2, 50, 12)])
def test_logme_equals_numerical_evidence_maximum(seed, n, dim):
  features, labels = _problem(seed, n, dim)
  got = scores.logme(features, labels, 3)
  want = reference_logme(features, labels, 3)
  assert got == pytest.approx(want, abs=1e-6)


def test_log_evidence_matches_marginal_likelihood_at_any_alpha_beta():
  features, labels = _problem(3, 20, 30)  # dim > n: zero eigenvalues of F^T F count too.
  y = (labels == 1).astype(np.float64)
  u, s, _ = np.linalg.svd(features, full_matrices=False)
  for alpha, beta in ((0.3, 2.0), (5.0, 0.7), (1e-2, 40.0)):
    got = scores.log_evidence(s, u.T @ y, float(y @ y), 20, 30, alpha, beta)[0]
    assert got == pytest.approx(reference_evidence(features, y, alpha, beta), rel=1e-10)


def test_logme_separable_outranks_noise():
  separable, noise, labels = _separable_and_noise(0)
  assert scores.logme(separable, labels) > scores.logme(noise, labels) + 0.5


# ---------------------------------------------------------------------------- LEEP


def reference_leep(probs, labels, num_classes):
  n, z_count = probs.shape
  joint = np.zeros((num_classes, z_count))
  for i in range(n):
    for z in range(z_count):
      joint[labels[i], z] += probs[i, z] / n
  total = 0.0
  for i in range(n):
    eep = 0.0
    for z in range(z_count):
      p_z = sum(joint[y, z] for y in range(num_classes))
      eep += joint[labels[i], z] / p_z * probs[i, z]
    total += np.log(eep)
  return total / n


@pytest.mark.parametrize("seed", [0, 1])
def test_leep_equals_explicit_loops(seed):
  rng = np.random.default_rng(seed)
  probs = rng.dirichlet(np.full(7, 0.5), size=30)
  labels = rng.integers(0, 4, size=30)
  assert scores.leep(probs, labels, 4) == pytest.approx(reference_leep(probs, labels, 4),
                                                        rel=1e-12)


def test_leep_known_answers():
  labels = np.array([0, 0, 1, 2, 2, 2])
  # Each target class lands on its own source class with certainty: LEEP = log 1 = 0.
  deterministic = np.eye(5)[labels + 2]
  assert scores.leep(deterministic, labels) == pytest.approx(0.0, abs=1e-12)
  # The same prediction for every image carries no information: LEEP = mean log prior.
  constant = np.tile([0.1, 0.2, 0.3, 0.4], (6, 1))
  prior = np.bincount(labels) / len(labels)
  assert scores.leep(constant, labels) == pytest.approx(np.mean(np.log(prior[labels])))


def test_leep_informative_outranks_random_and_rejects_logits():
  rng = np.random.default_rng(0)
  labels = np.arange(90) % 3
  informative = rng.dirichlet(np.full(10, 0.3), size=90)
  informative[np.arange(90), labels * 3] += 3.0  # Target class c votes source class 3c.
  informative /= informative.sum(1, keepdims=True)
  random = rng.dirichlet(np.full(10, 0.3), size=90)
  assert scores.leep(informative, labels) > scores.leep(random, labels) + 0.3
  with pytest.raises(ValueError, match="softmax"):
    scores.leep(np.log(informative), labels)


# ---------------------------------------------------------------------------- k-NN


def reference_knn(train, train_labels, query, k, num_classes):
  predicted = []
  for q in query:
    sims = [float(q @ t / np.linalg.norm(q) / np.linalg.norm(t)) for t in train]
    order = sorted(range(len(train)), key=lambda j: -sims[j])[:k]
    votes = [0] * num_classes
    closeness = [0.0] * num_classes
    for j in order:
      votes[train_labels[j]] += 1
      closeness[train_labels[j]] += sims[j]
    best = max(range(num_classes), key=lambda c: (votes[c], closeness[c]))
    predicted.append(best)
  return np.array(predicted)


@pytest.mark.parametrize("k", [1, 4, 5])
def test_knn_equals_explicit_sort_and_vote(k):
  rng = np.random.default_rng(k)
  train, train_labels = rng.normal(size=(25, 4)), rng.integers(0, 3, size=25)
  query = rng.normal(size=(15, 4))
  np.testing.assert_array_equal(scores.knn_predict(train, train_labels, query, k, 3),
                                reference_knn(train, train_labels, query, k, 3))


# ---------------------------------------------------------------------------- ridge


def reference_ridge_predict(z, labels, query, lam, num_classes):
  """Normal equations with an unpenalised intercept column, solved directly."""
  x = np.hstack([z, np.ones((len(z), 1))])
  penalty = lam * np.eye(x.shape[1])
  penalty[-1, -1] = 0.0
  w = np.linalg.solve(x.T @ x + penalty, x.T @ np.eye(num_classes)[labels])
  return np.argmax(np.hstack([query, np.ones((len(query), 1))]) @ w, axis=1)


def test_ridge_leave_one_out_and_fit_equal_refits():
  features, labels = _problem(4, 24, 5)
  probe = scores.RidgeProbe(l2_grid=(1e-3, 0.1, 3.0)).fit(features, labels, 3)
  z = (features - probe.mean) / probe.scale
  for l2, accuracy in probe.loo.items():
    hits = 0
    for i in range(len(z)):
      keep = np.arange(len(z)) != i
      hits += reference_ridge_predict(z[keep], labels[keep], z[i:i + 1], l2 * len(z), 3)[0] \
          == labels[i]
    assert accuracy == pytest.approx(hits / len(z))
  query = np.random.default_rng(5).normal(size=(10, 5))
  np.testing.assert_array_equal(
      probe.predict(query),
      reference_ridge_predict(z, labels, (query - probe.mean) / probe.scale,
                              probe.l2 * len(z), 3))


def test_knn_and_ridge_separable_outrank_noise():
  separable, noise, labels = _separable_and_noise(1)
  val_sep, val_noise, val_labels = _separable_and_noise(1, n=30)  # Same seed: same centres.
  assert scores.knn_accuracy(separable, labels, val_sep, val_labels, k=5) == 1.0
  assert scores.ridge_accuracy(separable, labels, val_sep, val_labels) == 1.0
  assert scores.knn_accuracy(noise, labels, val_noise, val_labels, k=5) < 0.7
  assert scores.ridge_accuracy(noise, labels, val_noise, val_labels) < 0.7


def test_score_all_reports_nan_leep_without_classifier():
  separable, _, labels = _separable_and_noise(2)
  result = scores.score_all(separable, labels, separable, labels, 3)
  assert np.isnan(result["leep"]) and result["knn_acc"] == 1.0 and result["ridge_acc"] == 1.0
