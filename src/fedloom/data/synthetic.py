"""FedProx's Synthetic(α, β) benchmark (Li et al., "Federated Optimization in Heterogeneous Networks", 2020).

Each device k has its own softmax-regression model and its own input distribution, so α controls how much
the local models differ and β how much the local inputs differ:

    n_k = floor(lognormal(4, 2)) + 50
    u_k ~ N(0, α),  B_k ~ N(0, β)
    W_k ~ N(u_k, 1) (d x C),  b_k ~ N(u_k, 1) (C),  v_k ~ N(B_k, 1) (d)
    x ~ N(v_k, Σ) with Σ = diag(j^-1.2), j = 1..d;   y = argmax softmax(x W_k + b_k)

The iid variant shares one W, b ~ N(0, 1) across devices and uses v_k = 0 (α, β unused).

Variance or standard deviation: the paper writes N(0, α); its generator
(FedProx `data/synthetic_*/generate_synthetic.py`) calls `np.random.normal(0, alpha, ...)`, whose
second argument is the standard deviation. We follow the code: α and β are standard deviations (the
same thing for the common α = β = 1 and α = β = 0). The second arguments "1" are unit std = unit variance.

The generator script splits each device's shuffled samples 90/10; the paper's setup is 80/20, which is
our default (`test_fraction=0.1` gives the script's split).
"""

from __future__ import annotations

import numpy as np


def generate(rng: np.random.Generator, alpha: float = 1.0, beta: float = 1.0, num_devices: int = 30,
             dimension: int = 60, num_classes: int = 10,
             iid: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(x float32 (N, d), y int64 (N,), device int64 (N,)) with the samples of each device contiguous."""
    sizes = np.floor(rng.lognormal(4, 2, num_devices)).astype(np.int64) + 50
    std_x = np.arange(1, dimension + 1, dtype=np.float64) ** -0.6  # sqrt of Σ_jj = j^-1.2
    if iid:
        w_shared = rng.normal(0, 1, (dimension, num_classes))
        b_shared = rng.normal(0, 1, num_classes)
        v = np.zeros((num_devices, dimension))
    else:
        u = rng.normal(0, alpha, num_devices)
        big_b = rng.normal(0, beta, num_devices)
        v = rng.normal(big_b[:, None], 1, (num_devices, dimension))
    xs, ys = [], []
    for k, n in enumerate(sizes):
        if iid:
            w, b = w_shared, b_shared
        else:
            w = rng.normal(u[k], 1, (dimension, num_classes))
            b = rng.normal(u[k], 1, num_classes)
        x = v[k] + std_x * rng.standard_normal((n, dimension))
        xs.append(x)
        ys.append(np.argmax(x @ w + b, axis=1))  # softmax is monotone: its argmax is the logits' argmax
    device = np.repeat(np.arange(num_devices, dtype=np.int64), sizes)
    return np.concatenate(xs).astype(np.float32), np.concatenate(ys).astype(np.int64), device

