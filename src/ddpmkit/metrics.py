"""Sample-quality metrics on feature vectors: the Frechet distance (FID) and precision/recall.

* FID (Heusel et al. 2017, "GANs trained by a two time-scale update rule ..."): the
  Frechet distance between Gaussians fitted to the features of real and generated
  images, d^2 = ||mu_r - mu_g||^2 + Tr(C_r + C_g - 2 (C_r C_g)^{1/2}).
* Precision and recall (Kynkaanniemi et al. 2019, "Improved precision and recall metric
  for assessing generative models", section 2): the real manifold is the union of balls
  around each real feature vector, of radius its distance to its k-th nearest real
  neighbour; precision is the fraction of generated points inside it, recall the
  fraction of real points inside the generated manifold built the same way.

Pure functions of (N, D) arrays: which network made the features, and how samples are
drawn and cached, is fid.py's.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch

from .errors import ConfigError

PRECISION_RECALL_K = 3  # Kynkaanniemi et al. use k = 3 throughout
# Distance blocks of precision/recall hold at most this many float32 entries (64 MiB).
_DISTANCE_BLOCK_ENTRIES = 1 << 24


# --- Frechet distance -------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class FeatureStats:
    """Mean (D,) and covariance (D, D) in float64 of n feature vectors."""

    mean: np.ndarray
    cov: np.ndarray
    n: int

    @classmethod
    def from_features(cls, features: np.ndarray | torch.Tensor) -> FeatureStats:
        features = _as_float64(features)
        if features.ndim != 2 or len(features) < 2:
            raise ConfigError(f"feature statistics need an (N, D) array with N >= 2, got shape {features.shape}")
        # Unbiased covariance (N - 1), as the reference FID implementations compute it;
        # the reshape keeps D = 1 a (1, 1) matrix (np.cov returns a scalar there).
        covariance = np.cov(features, rowvar=False).reshape(features.shape[1], features.shape[1])
        return cls(features.mean(axis=0), covariance, len(features))


def frechet_distance(features_a: np.ndarray | torch.Tensor, features_b: np.ndarray | torch.Tensor) -> float:
    """The Frechet distance between Gaussians fitted to two (N, D) feature sets."""
    a, b = FeatureStats.from_features(features_a), FeatureStats.from_features(features_b)
    return frechet_distance_from_stats(a.mean, a.cov, b.mean, b.cov)


def frechet_distance_from_stats(mu1: np.ndarray, cov1: np.ndarray, mu2: np.ndarray, cov2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + Tr(C1) + Tr(C2) - 2 Tr((C1 C2)^{1/2}), in float64.

    Tr((C1 C2)^{1/2}) is computed without a general matrix square root, so that singular
    covariances (fewer samples than dimensions, dead or duplicated features) give a
    finite real value instead of NaN or complex numbers. With S = C1^{1/2} the
    symmetric square root of C1, C1 C2 = S (S C2); and for any A, B the products AB and
    BA have the same non-zero eigenvalues, so C1 C2 has those of S C2 S. That matrix is
    symmetric positive semi-definite, so its eigenvalues lambda_i are real and >= 0, and
    the principal square root of C1 C2 has eigenvalues sqrt(lambda_i): its trace is
    sum_i sqrt(lambda_i). No inverse is needed, so nothing breaks when C1 is singular.
    Eigenvalues that rounding pushes slightly below 0 are clamped to 0.
    """
    mu1, mu2, cov1, cov2 = (_as_float64(v) for v in (mu1, mu2, cov1, cov2))
    if mu1.shape != mu2.shape or cov1.shape != cov2.shape or cov1.shape != mu1.shape * 2:
        raise ConfigError(f"statistics of different feature spaces: means {mu1.shape}, {mu2.shape}, covariances {cov1.shape}, {cov2.shape}")
    sqrt_cov1 = _psd_sqrt(cov1)
    middle = sqrt_cov1 @ cov2 @ sqrt_cov1
    eigenvalues = np.linalg.eigvalsh((middle + middle.T) / 2)  # symmetrised against rounding
    trace_sqrt = np.sqrt(np.clip(eigenvalues, 0.0, None)).sum()
    diff = mu1 - mu2
    distance = diff @ diff + np.trace(cov1) + np.trace(cov2) - 2.0 * trace_sqrt
    # A distance is >= 0; rounding can leave about -1e-12 for identical statistics.
    return max(float(distance), 0.0)


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    """The symmetric square root of a positive semi-definite matrix (negative rounding clamped)."""
    eigenvalues, eigenvectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (eigenvectors * np.sqrt(np.clip(eigenvalues, 0.0, None))) @ eigenvectors.T


def _as_float64(values: np.ndarray | torch.Tensor) -> np.ndarray:
    return torch.as_tensor(values).detach().cpu().double().numpy()


# --- precision and recall ---------------------------------------------------------------------

def precision_recall(
    real_features: np.ndarray | torch.Tensor, fake_features: np.ndarray | torch.Tensor, k: int = PRECISION_RECALL_K
) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019, eqs. 1-2) with k-NN radii.

    Distances are computed in blocks of rows, never as one N x N matrix.
    """
    real, fake = _as_float32_tensor(real_features), _as_float32_tensor(fake_features)
    if real.dim() != 2 or fake.dim() != 2 or real.shape[1] != fake.shape[1]:
        raise ConfigError(f"need two (N, D) feature sets of the same D, got {tuple(real.shape)} and {tuple(fake.shape)}")
    if k < 1 or min(len(real), len(fake)) <= k:
        raise ConfigError(f"precision/recall with k = {k} needs k >= 1 and more than k points per set, got {len(real)} and {len(fake)}")
    precision = _fraction_inside(fake, real, _knn_radii(real, k))
    recall = _fraction_inside(real, fake, _knn_radii(fake, k))
    return precision, recall


def _distance_blocks(queries: torch.Tensor, points: torch.Tensor) -> Iterable[torch.Tensor]:
    """Euclidean distances from blocks of query rows to all points."""
    rows = max(1, _DISTANCE_BLOCK_ENTRIES // len(points))
    for block in queries.split(rows):
        yield torch.cdist(block, points)


def _knn_radii(points: torch.Tensor, k: int) -> torch.Tensor:
    # The (k+1)-th smallest distance: the smallest is each point's distance to itself.
    return torch.cat([distances.kthvalue(k + 1, dim=1).values for distances in _distance_blocks(points, points)])


def _fraction_inside(queries: torch.Tensor, points: torch.Tensor, radii: torch.Tensor) -> float:
    """The fraction of queries within radii[i] of some points[i] (f(phi, Phi) of the paper)."""
    inside = sum(int((distances <= radii).any(dim=1).sum()) for distances in _distance_blocks(queries, points))
    return inside / len(queries)


def _as_float32_tensor(values: np.ndarray | torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(values).detach().float().cpu()
