"""Sample-quality metrics of the tiny image world, computed in the evaluator's feature space.

Exactly what is implemented (features = ``DigitEvaluator.features``, the 128-d post-ReLU
penultimate layer, computed in float32, all statistics in float64):

* ``fid`` - Fréchet distance between Gaussians fitted to the two feature sets (all classes pooled):
  ``|mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1^1/2 S2 S1^1/2)^1/2)``, covariances unbiased (N-1).
  Matrix square roots of the symmetric PSD matrices via ``torch.linalg.eigh`` with negative
  eigenvalues clamped to 0 (no scipy). Like FID it is biased upwards for small sets; compare numbers
  only at equal set sizes.
* ``accuracy`` - fraction of samples with a label in 0..9 that the evaluator classifies as their
  label (samples labelled ``NULL_LABEL`` are ignored by all per-class metrics).
* ``diversity`` - mean over classes of the trace of the (unbiased) feature covariance of the
  generated samples of that class (``reference_diversity``: the same for the reference set).
* ``recall`` / ``precision`` - improved precision/recall of Kynkäänniemi et al. (2019), computed per
  class and averaged over classes: the generated manifold of class c is the union of balls around
  each generated feature of class c with radius = distance to its k-th nearest neighbour (k = 3,
  itself excluded) among the generated features of class c. ``recall_c`` = fraction of reference
  images of class c inside that manifold (i.e. within the radius of at least one generated sample,
  not only of the nearest one). ``precision_c`` swaps the roles (generated samples inside the
  reference manifold of class c). Classes with <= k samples on either side are skipped.
"""

from __future__ import annotations

import functools

import torch

from .models import NULL_LABEL, NUM_CLASSES

KNN_K = 3


# ---------------------------------------------------------------- linear algebra / statistics


def _sym(a: torch.Tensor) -> torch.Tensor:
    return (a + a.transpose(-1, -2)) / 2


def sqrtm_psd(a: torch.Tensor) -> torch.Tensor:
    """Square root of a symmetric PSD matrix via eigh (float64, negative eigenvalues clamped)."""
    w, v = torch.linalg.eigh(_sym(a.double()))
    return (v * w.clamp_min(0).sqrt()) @ v.transpose(-1, -2)


def feature_stats(feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    f = feats.double()
    if f.shape[0] < 2:
        raise ValueError("need at least 2 samples for a covariance")
    mu = f.mean(0)
    c = f - mu
    return mu, c.T @ c / (f.shape[0] - 1)


def frechet_distance_from_stats(mu1, s1, mu2, s2) -> float:
    mu1, s1, mu2, s2 = (t.double() for t in (mu1, s1, mu2, s2))
    r1 = sqrtm_psd(s1)
    m = _sym(r1 @ s2 @ r1)
    tr_sqrt = torch.linalg.eigvalsh(m).clamp_min(0).sqrt().sum()
    d = (mu1 - mu2).pow(2).sum() + torch.trace(s1) + torch.trace(s2) - 2 * tr_sqrt
    return float(d.clamp_min(0))


def frechet_distance(feats_a: torch.Tensor, feats_b: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets ``[N, D]``, ``[M, D]``."""
    return frechet_distance_from_stats(*feature_stats(feats_a), *feature_stats(feats_b))


def knn_radii(feats: torch.Tensor, k: int = KNN_K) -> torch.Tensor:
    """Distance of each point to its k-th nearest neighbour in the same set (itself excluded)."""
    d = torch.cdist(feats.double(), feats.double())
    d.fill_diagonal_(float("inf"))
    return d.kthvalue(k, dim=1).values


def manifold_coverage(query: torch.Tensor, support: torch.Tensor, k: int = KNN_K) -> float:
    """Fraction of ``query`` points inside the k-NN manifold of ``support`` (Kynkäänniemi et al.)."""
    radii = knn_radii(support, k)
    d = torch.cdist(query.double(), support.double())
    return float((d <= radii[None]).any(1).double().mean())


def class_diversity(feats: torch.Tensor) -> float:
    return float(torch.trace(feature_stats(feats)[1]))


# ---------------------------------------------------------------- evaluator plumbing


@functools.lru_cache(maxsize=1)
def _default_evaluator():
    from .load import load_evaluator

    return load_evaluator()


@torch.no_grad()
def compute_features(images, evaluator=None, batch_size: int = 1000):
    """``(features [N, 128], logits [N, 10])`` of images ``[N, 1, 16, 16]`` in [-1, 1]
    (clamped to [-1, 1] first)."""
    ev = evaluator if evaluator is not None else _default_evaluator()
    p = next(ev.parameters())
    x = torch.as_tensor(images).float()
    if x.dim() == 3:
        x = x[:, None]
    feats, logits = [], []
    for s in range(0, x.shape[0], batch_size):
        xb = x[s : s + batch_size].to(device=p.device, dtype=p.dtype).clamp(-1, 1)
        f = ev.features(xb)
        feats.append(f.float().cpu())
        logits.append(ev.head(f).float().cpu())
    return torch.cat(feats), torch.cat(logits)


@functools.lru_cache(maxsize=1)
def _default_reference():
    from .data import load_digits_16

    x, y = load_digits_16("test")
    f, _ = compute_features(x)
    return f, y


def evaluate_samples(images, labels, reference=None, evaluator=None, k: int = KNN_K) -> dict:
    """Score generated ``images`` ``[N, 1, 16, 16]`` in [-1, 1] conditioned on ``labels`` ``[N]``.

    ``reference``: ``None`` = the held-out test split (297 images); or ``(images, labels)``; or an
    images tensor alone (its labels are then the evaluator's predictions).
    Returns ``dict(fid, accuracy, diversity, recall, precision, reference_diversity, n,
    per_class={accuracy, diversity, recall, precision: lists of 10, NaN where undefined})``.
    See the module docstring for the exact definitions.
    """
    labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1).cpu()
    feats, logits = compute_features(images, evaluator)
    if feats.shape[0] != labels.shape[0]:
        raise ValueError(f"{feats.shape[0]} images but {labels.shape[0]} labels")
    if reference is None and evaluator is None:
        rf, ry = _default_reference()
    elif reference is None:
        from .data import load_digits_16

        rx, ry = load_digits_16("test")
        rf, _ = compute_features(rx, evaluator)
    elif isinstance(reference, (tuple, list)):
        rf, _ = compute_features(reference[0], evaluator)
        ry = torch.as_tensor(reference[1], dtype=torch.long).reshape(-1).cpu()
    else:
        rf, rlog = compute_features(reference, evaluator)
        ry = rlog.argmax(1)

    pred = logits.argmax(1)
    cond = labels != NULL_LABEL
    nan = float("nan")
    out = {
        "n": int(labels.shape[0]),
        "fid": frechet_distance(feats, rf),
        "accuracy": float((pred[cond] == labels[cond]).double().mean()) if cond.any() else nan,
    }
    per = {"accuracy": [], "diversity": [], "reference_diversity": [], "recall": [], "precision": []}
    for c in range(NUM_CLASSES):
        g = feats[labels == c]
        r = rf[ry == c]
        per["accuracy"].append(float((pred[labels == c] == c).double().mean()) if len(g) else nan)
        per["diversity"].append(class_diversity(g) if len(g) >= 2 else nan)
        per["reference_diversity"].append(class_diversity(r) if len(r) >= 2 else nan)
        ok = len(g) > k and len(r) > k
        per["recall"].append(manifold_coverage(r, g, k) if ok else nan)
        per["precision"].append(manifold_coverage(g, r, k) if ok else nan)

    def _mean(v):
        v = [a for a in v if a == a]
        return sum(v) / len(v) if v else nan

    out["diversity"] = _mean(per["diversity"])
    out["recall"] = _mean(per["recall"])
    out["precision"] = _mean(per["precision"])
    out["reference_diversity"] = _mean(per["reference_diversity"])
    out["per_class"] = per
    return out
