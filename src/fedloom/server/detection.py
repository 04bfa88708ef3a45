"""Suspicion scores: which of a round's updates look like an attacker's (docs/robustness.md).

Per round and client, three features of its update:
- its norm (log scale; far above or below the round's typical norm: scaling, noise, free riders);
- its cosine to the coordinate-wise median of the round's updates, a reference attackers cannot drag as they
  drag the mean (low: sign flips, label flips, IPM);
- its cosine to the client's own previous update (low: a client that changed behaviour, or sends noise);
  used once at least half the round's clients (and `MIN_CLIENTS`) have a previous update to compare with.

Each feature is standardised robustly over the round (median and MAD; the cosines one-sided, as only low
agreement is suspicious). Two views of those features, each in [0, 1], are averaged into the suspicion:
- an isolation forest (Liu et al. 2008, scikit-learn): its anomaly score, about 0.5 and below for ordinary
  points, higher for points that few random splits isolate (unusual combinations of features);
- an outlier score from the largest robust z, 1 - 2^-(z / 3.5)^2: 0.5 at z = 3.5, the usual cut for outliers
  (Iglewicz and Hoaglin 1993), near 1 far beyond. The forest alone ranks points even in a round without
  attackers and, with several alike attackers, is masked by their cluster; this keeps the score anchored.
A client is flagged at suspicion >= 0.6 (`FLAG`), or at `server.exclude_suspicion` when set.

The previous updates are kept as count sketches (Charikar et al. 2002; `SKETCH` numbers each, whatever the
model's size), which preserve inner products, so the history costs `SKETCH` floats per client in the
checkpoint rather than a model per client.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ..rng import derive_seed, torch_rng
from .robust import weighted_median

SKETCH = 1024  # numbers kept per client for its previous update
FLAG = 0.6  # suspicion at or above which a client is flagged (precision / recall) when nothing is excluded
Z_OUTLIER = 3.5  # robust z from which one feature makes a client a clear outlier (Iglewicz and Hoaglin)
MIN_CLIENTS = 4  # fewer updates in a round: nothing to compare, no scores
_SCALE_FLOOR = {"norm": 0.05, "cos": 0.05}  # smallest spreads: a round of near-identical updates is not noise


@dataclass
class Scores:
    suspicion: list[float | None]
    cosine_ref: list[float]  # to the coordinate-wise median
    cosine_prev: list[float | None]  # to the client's previous update (None: first time seen)
    zmax: list[float]  # largest robust z over the features


class Detector:
    def __init__(self, size: int, seed: int, sketch: int = SKETCH):
        g = torch_rng(seed, "detect-sketch")
        self.width = min(sketch, size)
        self.bucket = torch.randint(0, self.width, (size,), generator=g)
        self.sign = torch.randint(0, 2, (size,), generator=g).float().mul_(2).sub_(1)
        self.seed = seed
        self.prev: dict[int, torch.Tensor] = {}

    def sketch(self, updates: torch.Tensor) -> torch.Tensor:
        """(n, width) count sketches of the rows (inner products preserved in expectation)."""
        out = torch.zeros(updates.shape[0], self.width, dtype=torch.float64)
        return out.index_add_(1, self.bucket, (updates * self.sign).to(torch.float64))

    def score(self, round_: int, clients: list[int], updates: torch.Tensor) -> tuple[Scores, torch.Tensor]:
        """The round's scores, and the sketches to `commit` once the round counts."""
        u = updates.to(torch.float64)
        n = u.shape[0]
        norms = torch.linalg.vector_norm(u, dim=1)
        ref = weighted_median(u, torch.full((n,), 1.0 / n, dtype=torch.float64))
        cos_ref = _cos(u, ref[None, :])
        sk = self.sketch(updates)
        cos_prev: list[float | None] = []
        for row, c in enumerate(clients):
            prev = self.prev.get(c)
            cos_prev.append(None if prev is None else float(_cos(sk[row : row + 1], prev[None, :].double())[0]))
        prev = np.array([np.nan if c is None else c for c in cos_prev])
        if np.isfinite(prev).sum() < max(MIN_CLIENTS, n / 2):  # too few histories for a median and MAD
            prev[:] = np.nan
        feats = np.column_stack([
            _robust_z(np.log(norms.numpy() + 1e-12), _SCALE_FLOOR["norm"]),
            np.minimum(_robust_z(cos_ref.numpy(), _SCALE_FLOOR["cos"]), 0.0),
            np.minimum(_robust_z(prev, _SCALE_FLOOR["cos"]), 0.0),
        ])
        feats = np.nan_to_num(feats, nan=0.0)
        zmax = np.abs(feats).max(axis=1)
        if n < MIN_CLIENTS:
            suspicion: list[float | None] = [None] * n
        else:
            forest = _forest_scores(feats, derive_seed(self.seed, "detect", round_) % (2**32))
            outlier = 1.0 - np.exp2(-((zmax / Z_OUTLIER) ** 2))
            suspicion = [float((f + o) / 2) for f, o in zip(forest, outlier, strict=True)]
        return Scores(suspicion, cos_ref.tolist(), cos_prev, zmax.tolist()), sk

    def commit(self, clients: list[int], sketches: torch.Tensor) -> None:
        for row, c in enumerate(clients):
            self.prev[c] = sketches[row].to(torch.float32)

    def state(self) -> dict[str, torch.Tensor]:
        return {str(c): v for c, v in self.prev.items()}

    def load(self, state: dict[str, torch.Tensor]) -> None:
        self.prev = {int(c): v for c, v in state.items()}


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    na = torch.linalg.vector_norm(a, dim=1)
    nb = torch.linalg.vector_norm(b, dim=1)
    return (a * b).sum(1) / (na * nb).clamp(min=1e-300)


def _robust_z(x: np.ndarray, floor: float) -> np.ndarray:
    """(x - median) / (1.4826 MAD), the spread floored at `floor`; NaN entries stay NaN and are not counted."""
    ok = np.isfinite(x)
    if not ok.any():
        return np.full_like(x, np.nan)
    med = float(np.median(x[ok]))
    mad = 1.4826 * float(np.median(np.abs(x[ok] - med)))
    return (x - med) / max(mad, floor)


def _forest_scores(feats: np.ndarray, seed: int) -> np.ndarray:
    """Isolation-forest anomaly scores in (0, 1] (Liu et al.'s s; scikit-learn's score_samples negated)."""
    from sklearn.ensemble import IsolationForest

    forest = IsolationForest(n_estimators=100, max_samples=min(256, len(feats)), random_state=seed)
    return -forest.fit(feats).score_samples(feats)


def precision_recall(flagged: set[int], attackers: set[int]) -> tuple[float | None, float | None]:
    """Of the flagged clients, the share that attacked; of the attackers, the share flagged (None: no denominator)."""
    hit = len(flagged & attackers)
    return (hit / len(flagged) if flagged else None), (hit / len(attackers) if attackers else None)


def flag_threshold(exclude: float | None) -> float:
    return FLAG if exclude is None else exclude


def finite_or_none(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else x


def summarize(rounds: list[dict], fits: list[dict]) -> dict | None:
    """A run's detection record from the store (round metrics and 'fit' client rows): per client how often it was
    flagged or left out, and, when the run knows who attacked, precision and recall over all scored
    (client, round) pairs. None when the run recorded neither scores, exclusions nor attackers."""
    flagged = {r["round"]: set(r["metrics"].get("flagged") or []) for r in rounds}
    excluded = {r["round"]: r["metrics"].get("excluded_clients") or {} for r in rounds}
    has_attack = any("attackers" in r["metrics"] for r in rounds)
    if not any(flagged.values()) and not any(excluded.values()) and not has_attack \
            and not any(f.get("suspicion") is not None for f in fits):
        return None
    per: dict[int, dict] = {}
    tp = fp = fn = 0
    for f in fits:
        c, rnd = f["client_id"], f["round"]
        d = per.setdefault(c, {"client": c, "rounds": 0, "flagged": 0, "non_finite": 0, "excluded": 0,
                               "attacked": 0, "suspicion": []})
        d["rounds"] += 1
        why = f.get("excluded") or excluded.get(rnd, {}).get(str(c))
        d["non_finite"] += int(bool(why) and why.startswith("non-finite"))
        d["excluded"] += int(bool(why) and why.startswith("suspicion"))
        d["attacked"] += int(bool(f.get("attacker")))
        s = finite_or_none(f.get("suspicion"))
        if s is None:
            continue
        d["suspicion"].append(s)
        hit, bad = c in flagged.get(rnd, set()), bool(f.get("attacker"))
        d["flagged"] += int(hit)
        tp, fp, fn = tp + int(hit and bad), fp + int(hit and not bad), fn + int(bad and not hit)
    clients = []
    for d in per.values():
        s = d.pop("suspicion")
        d["max_suspicion"] = round(max(s), 3) if s else None
        d["median_suspicion"] = round(float(np.median(s)), 3) if s else None
        clients.append(d)
    clients.sort(key=lambda d: (-d["flagged"] - d["excluded"] - d["non_finite"], -(d["max_suspicion"] or 0)))
    known = has_attack  # precision and recall need the truth: only a simulated attack has it
    return {"attack": has_attack, "attackers": sorted(c for c, d in per.items() if d["attacked"]),
            "precision": tp / (tp + fp) if known and tp + fp else None,
            "recall": tp / (tp + fn) if known and tp + fn else None,
            "true_positives": tp, "false_positives": fp, "false_negatives": fn, "clients": clients}
