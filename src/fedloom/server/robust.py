"""Robust aggregators: estimates of the weighted combination an algorithm asks for that a few bad updates
cannot drag far (docs/robustness.md).

Every aggregator here answers the same call as `mean`, `combine(updates, weights)`: with p = weights / s and
s = sum(weights), it returns s times a robust estimate of the p-weighted mean. So FedAvg's example-weighted
mean, SCAFFOLD's Δc summed over N (s = |S|/N) and FedNova's normalized weights all keep their scale. Where the
robust rule has a weighted form (trimmed mean, median, geometric median, norm bounding, centered clipping,
Multi-Krum's average) it uses p, so that with nothing to trim or clip it is the mean exactly.

The round logic gives each aggregator a `RoundContext` before the algorithm aggregates: which client each row
is, the round, a server-side state dict checkpointed with the run (centered clipping's last aggregate,
FoolsGold's histories), and, for FLTrust, a callable that trains the server's own update on its root set. An
algorithm may combine several times a round (SCAFFOLD: Δy then Δc); each call has its own state slot.

Breakdown conditions are checked with the numbers (`check(n)`): at config time with `clients_per_round`, and
in every round with the clients whose updates are actually aggregated.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..errors import ConfigError, RunError

State = dict[str, torch.Tensor]


@dataclass
class RoundContext:
    """What a robust aggregator may know about the round beyond the stack of updates."""

    round: int
    clients: list[int]  # the client id of each row of the updates
    seed: int = 0
    state: State = field(default_factory=dict)  # server-side, checkpointed with the run (`aggregator/...`)
    server_update: Callable[[], torch.Tensor] | None = None  # FLTrust: the server's update on its root set
    calls: int = 0  # combine calls so far this round (each has its own state slot)
    notes: dict[str, Any] = field(default_factory=dict)  # what the aggregator decided (JSON), for the round's metrics
    cache: dict[str, Any] = field(default_factory=dict)  # kept between the combine calls of the round only


# ---- parameters ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Param:
    default: Any
    kind: type  # int or float (an int is accepted for a float)
    low: float | None = None  # inclusive
    high: float | None = None  # exclusive
    top: float | None = None  # inclusive upper bound
    optional: bool = False  # None allowed (and then the default may be None)
    text: str = ""


def parse_params(name: str, given: dict[str, Any], spec: dict[str, Param],
                 prefix: str = "server.aggregator_params", owner: str = "aggregator") -> dict[str, Any]:
    """`given` checked against `spec`: unknown keys and bad values refused in one line naming the key
    (`prefix.key`); returns every parameter, defaults filled in."""
    out: dict[str, Any] = {}
    for key, value in given.items():
        if key not in spec:
            import difflib

            close = difflib.get_close_matches(key, spec, n=1)
            takes = f"it takes {', '.join(spec)}" if spec else "it takes no parameters"
            raise ConfigError(f"{prefix}.{key}: {owner} '{name}' has no parameter '{key}'",
                              f"did you mean '{close[0]}'?" if close else takes)
        out[key] = _checked(f"{prefix}.{key} = {value!r}", value, spec[key])
    return {k: out.get(k, p.default) for k, p in spec.items()}


def _checked(where: str, value: Any, p: Param) -> Any:
    if value is None and p.optional:
        return None
    ok_type = isinstance(value, p.kind) or (p.kind is float and isinstance(value, int))
    if isinstance(value, bool) or not ok_type or (isinstance(value, float) and not math.isfinite(value)):
        want = "an integer" if p.kind is int else "a finite number"
        raise ConfigError(f"{where}: expected {want} ({p.text})", "see docs/robustness.md")
    if ((p.low is not None and value < p.low) or (p.high is not None and value >= p.high)
            or (p.top is not None and value > p.top)):
        rng = " and ".join(s for s in (f">= {p.low}" if p.low is not None else "",
                                       f"< {p.high}" if p.high is not None else "",
                                       f"<= {p.top}" if p.top is not None else "") if s)
        raise ConfigError(f"{where}: must be {rng} ({p.text})", "see docs/robustness.md")
    return p.kind(value)


# ---- the base -----------------------------------------------------------------------------------------

class RobustAggregator:
    """s times a robust estimate of the p-weighted mean; subclasses implement `estimate`."""

    name = "robust"
    sees_clients = True  # reads each client's update: secure aggregation cannot run it
    PARAMS: dict[str, Param] = {}

    def __init__(self, params: dict[str, Any] | None = None):
        self.params = parse_params(self.name, dict(params or {}), self.PARAMS)
        self.context: RoundContext | None = None

    def __getstate__(self) -> dict[str, Any]:
        # engines ship the algorithm (and so its aggregator) to workers: the round's context stays home
        return {**self.__dict__, "context": None}

    def check(self, n: int, where: str = "") -> None:
        """Refuse `n` updates when the rule's breakdown condition does not hold (ConfigError at config time,
        RunError in a round: `where` names the round)."""
        why = self.breakdown(n)
        if why:
            cls = RunError if where else ConfigError
            raise cls(f"{where + ': ' if where else ''}aggregator '{self.name}' {why}"
                      f"{'' if where else ' (server.clients_per_round)'}",
                      "lower server.aggregator_params.f (the attackers it tolerates) or aggregate more clients a "
                      "round (server.clients_per_round)")

    def breakdown(self, n: int) -> str | None:
        return None if n >= 1 else "needs at least one update"

    def describe(self) -> dict[str, Any]:
        return {k: v for k, v in self.params.items() if v is not None}

    def combine(self, updates: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        ctx = self.context
        call = 0
        if ctx is not None:
            call, ctx.calls = ctx.calls, ctx.calls + 1
        w = weights.to(torch.float64)
        s = w.sum()
        if updates.shape[0] == 0 or s <= 0:
            return torch.zeros(updates.shape[1], dtype=updates.dtype)
        est = self.estimate(updates.to(torch.float64), w / s, call)
        return (est * s).to(updates.dtype)

    def estimate(self, u: torch.Tensor, p: torch.Tensor, call: int) -> torch.Tensor:
        raise NotImplementedError

    # helpers for subclasses
    def _state(self) -> State:
        return self.context.state if self.context is not None else {}

    def _note(self, key: str, value: Any) -> None:
        if self.context is not None:
            self.context.notes[key] = value

    def _round(self) -> int:
        return self.context.round if self.context is not None else 0


# ---- the rules ----------------------------------------------------------------------------------------

def weighted_mean(u: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    return p @ u


def weighted_median(u: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Per coordinate, the value where the cumulative weight of the sorted values reaches half; on an exact tie
    (equal weights, even count) the midpoint of the two middle values, so equal weights give the usual median."""
    n = u.shape[0]
    vals, order = u.sort(dim=0, stable=True)
    cum = p[order].cumsum(0)
    half = 0.5 * float(p.sum())
    eps = 1e-12
    j = (cum < half - eps).sum(0, keepdim=True).clamp(max=n - 1)
    lo = vals.gather(0, j)
    hi = vals.gather(0, (j + 1).clamp(max=n - 1))
    tie = (cum.gather(0, j) - half).abs() <= eps
    return torch.where(tie, (lo + hi) / 2, lo).squeeze(0)


class Median(RobustAggregator):
    """Coordinate-wise (weighted) median (Yin et al. 2018)."""

    name = "median"

    def estimate(self, u: torch.Tensor, p: torch.Tensor, call: int) -> torch.Tensor:
        return weighted_median(u, p)


class TrimmedMean(RobustAggregator):
    """Coordinate-wise trimmed mean (Yin et al. 2018): per coordinate, the k smallest and k largest values are
    dropped and the rest averaged with their weights; k = f, or floor(beta * n)."""

    name = "trimmed-mean"
    PARAMS = {"beta": Param(0.1, float, 0.0, 0.5, text="fraction trimmed from each side"),
              "f": Param(None, int, 0, optional=True, text="values trimmed from each side (overrides beta)")}

    def trim(self, n: int) -> int:
        return self.params["f"] if self.params["f"] is not None else math.floor(self.params["beta"] * n)

    def breakdown(self, n: int) -> str | None:
        k = self.trim(n)
        if 2 * k >= n:
            return f"trims {k} values from each side, which needs 2*{k} < n, but n = {n} updates"
        return super().breakdown(n)

    def estimate(self, u: torch.Tensor, p: torch.Tensor, call: int) -> torch.Tensor:
        n = u.shape[0]
        k = self.trim(n)
        vals, order = u.sort(dim=0, stable=True)
        w = p[order][k : n - k]
        return (vals[k : n - k] * w).sum(0) / w.sum(0).clamp(min=1e-300)


def pairwise_sq_dists(u: torch.Tensor) -> torch.Tensor:
    sq = (u * u).sum(1)
    return (sq[:, None] + sq[None, :] - 2 * (u @ u.T)).clamp(min=0).fill_diagonal_(0)


def krum_scores(d2: torch.Tensor, f: int) -> torch.Tensor:
    """Krum's score of each row: the sum of its squared distances to its n - f - 2 nearest other rows."""
    n = d2.shape[0]
    k = max(0, n - f - 2)
    if k == 0 or n == 1:
        return torch.zeros(n, dtype=d2.dtype)
    others = d2 + torch.diag(torch.full((n,), math.inf, dtype=d2.dtype))
    return others.sort(dim=1).values[:, :k].sum(1)


def lowest(scores: torch.Tensor, m: int) -> list[int]:
    """Indices of the m lowest scores, ties to the lower index."""
    return sorted(torch.argsort(scores, stable=True)[:m].tolist())


class Krum(RobustAggregator):
    """Krum and Multi-Krum (Blanchard et al. 2017): score each update by its squared distances to its n - f - 2
    nearest neighbours; Krum returns the best-scored update, Multi-Krum the weighted mean of the m best."""

    name = "krum"
    PARAMS = {"f": Param(1, int, 0, text="attackers tolerated"),
              "m": Param(1, int, 1, optional=True, text="updates averaged (None: n - f)")}

    def selected(self, n: int) -> int:
        m = self.params["m"]
        return n - self.params["f"] if m is None else m

    def breakdown(self, n: int) -> str | None:
        f = self.params["f"]
        if n <= 2 * f + 2:
            return f"with f = {f} needs n > 2f + 2 = {2 * f + 2} updates, but n = {n}"
        if self.selected(n) > n:
            return f"averages m = {self.selected(n)} updates, but n = {n}"
        return super().breakdown(n)

    def estimate(self, u: torch.Tensor, p: torch.Tensor, call: int) -> torch.Tensor:
        keep = lowest(krum_scores(pairwise_sq_dists(u), self.params["f"]), self.selected(u.shape[0]))
        self._note("selected", [self._client(i) for i in keep])
        w = p[keep]
        return weighted_mean(u[keep], w / w.sum())

    def _client(self, row: int) -> int:
        return self.context.clients[row] if self.context is not None else row


class MultiKrum(Krum):
    name = "multi-krum"
    PARAMS = {"f": Param(1, int, 0, text="attackers tolerated"),
              "m": Param(None, int, 1, optional=True, text="updates averaged (None: n - f)")}


class Bulyan(RobustAggregator):
    """Bulyan (El Mhamdi et al. 2018): Krum picks θ = n - 2f updates one at a time; then per coordinate the
    β = θ - 2f values closest to their median are averaged (with their weights)."""

    name = "bulyan"
    PARAMS = {"f": Param(1, int, 0, text="attackers tolerated")}

    def breakdown(self, n: int) -> str | None:
        f = self.params["f"]
        if n < 4 * f + 3:
            return f"with f = {f} needs n >= 4f + 3 = {4 * f + 3} updates, but n = {n}"
        return super().breakdown(n)

    def estimate(self, u: torch.Tensor, p: torch.Tensor, call: int) -> torch.Tensor:
        f = self.params["f"]
        n = u.shape[0]
        d2 = pairwise_sq_dists(u)
        remaining, chosen = list(range(n)), []
        for _ in range(n - 2 * f):
            sub = d2[remaining][:, remaining]
            best = remaining[lowest(krum_scores(sub, f), 1)[0]]
            chosen.append(best)
            remaining.remove(best)
        chosen.sort()
        vals, w = u[chosen], p[chosen]
        beta = len(chosen) - 2 * f
        med = weighted_median(vals, torch.full((len(chosen),), 1.0 / len(chosen), dtype=vals.dtype))
        closest = (vals - med).abs().argsort(dim=0, stable=True)[:beta]
        wk = w[closest]
        return (vals.gather(0, closest) * wk).sum(0) / wk.sum(0)


class GeometricMedian(RobustAggregator):
    """RFA (Pillutla et al. 2022): the weighted geometric median by smoothed Weiszfeld iterations, started at
    the weighted mean."""

    name = "geometric-median"
    PARAMS = {"iters": Param(10, int, 1, text="Weiszfeld iterations at most"),
              "nu": Param(1e-6, float, 0.0, text="smoothing: distances below it count as nu"),
              "tol": Param(1e-6, float, 0.0, text="stop when the estimate moves less than tol times its norm")}

    def estimate(self, u: torch.Tensor, p: torch.Tensor, call: int) -> torch.Tensor:
        v = weighted_mean(u, p)
        nu, tol = self.params["nu"], self.params["tol"]
        for _ in range(self.params["iters"]):
            beta = p / torch.linalg.vector_norm(u - v, dim=1).clamp(min=max(nu, 1e-300))
            new = (beta / beta.sum()) @ u
            moved = float(torch.linalg.vector_norm(new - v))
            v = new
            if moved <= tol * max(float(torch.linalg.vector_norm(v)), 1e-12):
                break
        return v


def clip_rows(u: torch.Tensor, bound: float) -> torch.Tensor:
    norms = torch.linalg.vector_norm(u, dim=1, keepdim=True)
    return u * (bound / norms.clamp(min=1e-300)).clamp(max=1.0)


class NormBound(RobustAggregator):
    """Norm bounding (Sun et al. 2019): every update clipped to norm at most `bound`, then the weighted mean,
    plus optional Gaussian noise of std `noise` on every coordinate (their "weak DP")."""

    name = "norm-bound"
    PARAMS = {"bound": Param(1.0, float, 0.0, text="largest update norm kept; larger updates are scaled down"),
              "noise": Param(0.0, float, 0.0, text="std of the Gaussian noise added to the mean")}

    def estimate(self, u: torch.Tensor, p: torch.Tensor, call: int) -> torch.Tensor:
        v = weighted_mean(clip_rows(u, self.params["bound"]), p)
        if self.params["noise"] > 0:
            from ..rng import torch_rng

            seed = self.context.seed if self.context is not None else 0
            g = torch_rng(seed, "aggregator-noise", self._round(), call)
            v = v + self.params["noise"] * torch.randn(v.shape, generator=g, dtype=v.dtype)
        return v


class CenteredClip(RobustAggregator):
    """Centered clipping (Karimireddy, He and Jaggi 2021): from v, the last round's aggregate (zero at first),
    `iters` times v <- v + sum_k p_k clip_tau(u_k - v). With tau large it is the mean after one iteration."""

    name = "centered-clip"
    PARAMS = {"tau": Param(1.0, float, 0.0, text="clipping radius around the centre"),
              "iters": Param(3, int, 1, text="clipping iterations")}

    def estimate(self, u: torch.Tensor, p: torch.Tensor, call: int) -> torch.Tensor:
        state = self._state()
        key = f"centered-clip/{call}"
        v = state.get(key)
        v = torch.zeros(u.shape[1], dtype=u.dtype) if v is None or v.numel() != u.shape[1] else v.to(u.dtype)
        for _ in range(self.params["iters"]):
            v = v + p @ clip_rows(u - v, self.params["tau"])
        state[key] = v.to(torch.float32)
        return v


class FLTrust(RobustAggregator):
    """FLTrust (Cao et al. 2021): the server trains its own update g0 on a small root set; client k's trust is
    ReLU(cos(u_k, g0)), its update is rescaled to the norm of g0, and the aggregate is the trust-weighted mean.
    Example counts are not used (as in the paper). Trust and rescaling come from the round's first combine
    (the parameter update) and apply to every combine of the round (SCAFFOLD's Δc too)."""

    name = "fltrust"
    PARAMS = {"root_size": Param(100, int, 1, text="examples in the server's root set, drawn from the training set")}

    def estimate(self, u: torch.Tensor, p: torch.Tensor, call: int) -> torch.Tensor:
        ctx = self.context
        if ctx is None or ctx.server_update is None:
            raise RuntimeError("fltrust needs the round's server update (RoundContext.server_update)")
        if "fltrust" not in ctx.cache:
            g0 = ctx.server_update().to(torch.float64)
            if g0.numel() != u.shape[1]:
                raise RuntimeError(f"fltrust: the server update has {g0.numel()} entries, the updates {u.shape[1]}")
            ctx.cache["fltrust"] = trust_scores(u, g0)
            ctx.notes["trust"] = [round(float(t), 4) for t in ctx.cache["fltrust"][0]]
        trust, scale = ctx.cache["fltrust"]
        w = trust * scale
        total = float(trust.sum())
        return (w @ u) / total if total > 0 else torch.zeros(u.shape[1], dtype=u.dtype)


def trust_scores(u: torch.Tensor, g0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """FLTrust's (trust, rescaling) per row: ReLU(cos(u_k, g0)) and ||g0|| / ||u_k||."""
    norms = torch.linalg.vector_norm(u, dim=1).clamp(min=1e-300)
    g_norm = torch.linalg.vector_norm(g0)
    trust = ((u @ g0) / (norms * g_norm.clamp(min=1e-300))).clamp(min=0)
    return trust, g_norm / norms


class FoolsGold(RobustAggregator):
    """FoolsGold (Fung et al. 2020): clients whose update histories point the same way (sybils) are down-weighted.
    Each client's history (the sum of its updates so far) is server state; weights follow the paper's
    pardoning and logit steps, and multiply the example weights."""

    name = "foolsgold"
    PARAMS = {"kappa": Param(1.0, float, 1e-12, text="confidence of the logit step")}

    def estimate(self, u: torch.Tensor, p: torch.Tensor, call: int) -> torch.Tensor:
        state = self._state()
        clients = self.context.clients if self.context is not None else list(range(u.shape[0]))
        hist = []
        for row, c in enumerate(clients):
            key = f"foolsgold/{call}/{c}"
            h = state.get(key)
            h = u[row].clone() if h is None or h.numel() != u.shape[1] else h.to(u.dtype) + u[row]
            state[key] = h.to(torch.float32)
            hist.append(h)
        alpha = foolsgold_weights(torch.stack(hist), self.params["kappa"])
        self._note("weights", [round(float(a), 4) for a in alpha])
        w = alpha * p
        total = float(w.sum())
        return (w @ u) / total if total > 0 else torch.zeros(u.shape[1], dtype=u.dtype)


def foolsgold_weights(hist: torch.Tensor, kappa: float = 1.0) -> torch.Tensor:
    """FoolsGold's per-client weights in [0, 1] from their histories (Fung et al. 2020, Algorithm 1)."""
    n = hist.shape[0]
    norms = torch.linalg.vector_norm(hist, dim=1).clamp(min=1e-300)
    cs = (hist @ hist.T) / (norms[:, None] * norms[None, :]) - torch.eye(n, dtype=hist.dtype)
    maxcs = cs.max(dim=1).values
    # i less similar to anyone than j is: i's similarity to j is pardoned by maxcs_i / maxcs_j
    pardon = (maxcs[:, None] < maxcs[None, :]) & (maxcs[None, :] != 0)
    cs = torch.where(pardon, cs * maxcs[:, None] / torch.where(pardon, maxcs[None, :], 1.0), cs)
    wv = (1 - cs.max(dim=1).values).clamp(0, 1)
    if float(wv.max()) <= 0:
        return wv
    wv = wv / wv.max()
    wv = torch.where(wv == 1, torch.full_like(wv, 0.99), wv)
    logit = kappa * (torch.log(wv / (1 - wv)) + 0.5)
    return torch.nan_to_num(logit, nan=0.0, posinf=1.0, neginf=0.0).clamp(0, 1)


ROBUST: dict[str, type[RobustAggregator]] = {
    cls.name: cls for cls in (Krum, MultiKrum, Median, TrimmedMean, Bulyan, GeometricMedian, NormBound,
                              CenteredClip, FLTrust, FoolsGold)
}


# ---- bounded example counts -------------------------------------------------------------------------------

def cap_shares(counts: list[float], cap: float) -> list[float]:
    """Example counts rescaled so no client's share of the total exceeds `cap`, the excess spread over the others
    in proportion to their counts (water-filling); the total is kept. Uniform when cap * n < 1 (no other way)."""
    n = np.asarray(counts, dtype=np.float64)
    total = float(n.sum())
    if total <= 0 or not len(n):
        return list(map(float, n))
    if cap * len(n) < 1:
        return [total / len(n)] * len(n)
    w = n / total
    fixed = np.zeros(len(n), dtype=bool)
    for _ in range(len(n)):
        over = (w > cap * (1 + 1e-12)) & ~fixed
        if not over.any():
            break
        fixed |= over
        w[fixed] = cap
        rest = ~fixed
        w[rest] = w[rest] / w[rest].sum() * (1 - cap * fixed.sum()) if w[rest].sum() > 0 else w[rest]
    return (w * total).tolist()


# ---- FLTrust's root set -----------------------------------------------------------------------------------

class RootTrainer:
    """The server's own update for FLTrust: local training, as a client does it, from the global model on a
    root set of `size` training examples drawn once from the whole training set (seeded).

    It takes as many local steps as an average client does (the paper uses the same local iterations on the
    server as on the clients): one epoch over a 100-example root set is a tenth of a client's steps, and since
    every client update is rescaled to the server update's norm, the model would then barely move."""

    def __init__(self, runtime: Any, size: int, seed: int):
        import math

        from ..client.trainer import step_count
        from ..rng import numpy_rng

        n = len(runtime.data.dataset.y_train)
        self.runtime, self.seed = runtime, seed
        self.idx = numpy_rng(seed, "fltrust-root").choice(n, min(size, n), replace=False)
        t = runtime.train
        sizes = [len(c.train_idx) for c in runtime.data.clients if len(c.train_idx) > 0] or [len(self.idx)]
        self.steps = max(1, math.ceil(sum(step_count(k, t.batch_size, t.local_epochs, t.local_steps)
                                          for k in sizes) / len(sizes)))

    def __call__(self, round_: int, lr: float, params: torch.Tensor) -> torch.Tensor:
        from ..client.trainer import local_train
        from ..params import load_vector, model_vector
        from ..rng import torch_rng

        rt = self.runtime
        load_vector(rt.model, rt.spec, params)
        local_train(rt.model, rt.data.dataset, self.idx, rt.train, lr, torch_rng(self.seed, "fltrust", round_),
                    steps=self.steps)
        delta = model_vector(rt.model, rt.spec) - params
        return delta if rt.shared is None else delta[rt.shared]
