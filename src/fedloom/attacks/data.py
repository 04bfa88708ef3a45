"""Data poisoning: label flipping and backdoor triggers, applied to the attacker's batches in local training.

Both hand local training a view of the dataset (`dataclasses.replace` of the shared one: no copy of the
features) whose training labels, and for a backdoor some training inputs, are poisoned. Only the attacker's
own samples are ever read through it, and the test split is untouched.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..server.robust import Param
from .base import Attack

if TYPE_CHECKING:
    from ..algorithms import ClientContext
    from ..data.datasets import Dataset


class LabelFlip(Attack):
    """Every training label y becomes C - 1 - y (the classic flip), or only `source` becomes `target`."""

    kind = "label-flip"
    poisons_data = True
    PARAMS = {"source": Param(None, int, 0, optional=True, text="the class to relabel (None: every class)"),
              "target": Param(None, int, 0, optional=True, text="its new label (with source)")}

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        src, dst, k = self.params["source"], self.params["target"], self.setting.num_classes
        from ..errors import ConfigError

        if (src is None) != (dst is None):
            raise ConfigError("attack.params: label-flip takes both source and target, or neither (flip all)")
        for key in ("source", "target"):
            if self.params[key] is not None and self.params[key] >= k:
                raise ConfigError(f"attack.params.{key} = {self.params[key]}: the dataset has {k} classes "
                                  f"(0..{k - 1})")
        self._labels: tuple[int, torch.Tensor] | None = None  # (id of the dataset, its flipped labels)

    def mapping(self) -> torch.Tensor:
        """The new label of each class."""
        k = self.setting.num_classes
        src, dst = self.params["source"], self.params["target"]
        if src is None:
            return torch.arange(k - 1, -1, -1)
        m = torch.arange(k)
        m[src] = dst
        return m

    def flipped(self, ds: Dataset) -> torch.Tensor:
        if self._labels is None or self._labels[0] != id(ds.y_train):
            self._labels = (id(ds.y_train), self.mapping()[ds.y_train])
        return self._labels[1]

    def poison(self, ctx: ClientContext) -> None:
        ctx.dataset = dataclasses.replace(ctx.dataset, y_train=self.flipped(ctx.dataset))

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_labels": None}


class _Rows:
    """Rows of a tensor, changed on the way out by `fn(indices, rows)`: `x_train[sel]` of a poisoned view."""

    def __init__(self, base: torch.Tensor, fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]):
        self.base, self.fn = base, fn
        self.shape, self.dtype = base.shape, base.dtype

    def __getitem__(self, idx: Any) -> torch.Tensor:
        idx = torch.as_tensor(idx, dtype=torch.long)
        return self.fn(idx, self.base[idx])

    def __len__(self) -> int:
        return len(self.base)

    def numpy(self) -> np.ndarray:
        return self.base.numpy()


def stamp(x: torch.Tensor, size: int) -> torch.Tensor:
    """The trigger: a `size` x `size` checkerboard in the bottom-right corner of every image (of every channel),
    at the extremes of the pixel range (0 / 255 for uint8 images, -3 / 3 for standardised features); for flat
    features, the last `size` features set to that alternating pattern."""
    x = x.clone()
    hi, lo = (255, 0) if x.dtype == torch.uint8 else (3.0, -3.0)
    if x.dim() >= 3:
        s = min(size, x.shape[-1], x.shape[-2])
        board = (torch.arange(s)[:, None] + torch.arange(s)[None, :]) % 2 == 0
        pattern = torch.where(board, torch.tensor(hi, dtype=x.dtype), torch.tensor(lo, dtype=x.dtype))
        x[..., -s:, -s:] = pattern
    else:
        s = min(size, x.shape[-1])
        pattern = torch.tensor([hi if i % 2 == 0 else lo for i in range(s)], dtype=x.dtype)
        x[..., -s:] = pattern
    return x


class Backdoor(Attack):
    """A pixel-pattern backdoor (Gu et al. 2017; Bagdasaryan et al. 2020): a `fraction` of the attacker's
    training samples carry the trigger and the `target` label; the rest stay clean, so the model keeps its main
    task. `scale` > 1 boosts the update (model replacement)."""

    kind = "backdoor"
    poisons_data = True
    PARAMS = {"target": Param(0, int, 0, text="the label the trigger asks for"),
              "size": Param(4, int, 1, text="side of the trigger in pixels (features for flat data)"),
              "fraction": Param(0.5, float, 0.0, top=1.0, text="share of the attacker's samples poisoned"),
              "scale": Param(1.0, float, 0.0, text="factor on the update (model replacement when > 1)")}

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        from ..errors import ConfigError

        if self.params["target"] >= self.setting.num_classes:
            raise ConfigError(f"attack.params.target = {self.params['target']}: the dataset has "
                              f"{self.setting.num_classes} classes (0..{self.setting.num_classes - 1})")
        self._mask: tuple[int, torch.Tensor] | None = None

    def mask(self, n: int) -> torch.Tensor:
        """Which training samples carry the trigger when an attacker trains on them (seeded, fixed)."""
        if self._mask is None or self._mask[0] != n:
            from ..rng import numpy_rng

            rng = numpy_rng(self.setting.seed, "backdoor")
            self._mask = (n, torch.from_numpy(rng.random(n) < self.params["fraction"]))
        return self._mask[1]

    def poison(self, ctx: ClientContext) -> None:
        ds = ctx.dataset
        mask, size, target = self.mask(len(ds.y_train)), self.params["size"], self.params["target"]

        def x_of(idx: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
            m = mask[idx]
            if m.any():
                rows = rows.clone()
                rows[m] = stamp(rows[m], size)
            return rows

        def y_of(idx: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
            return torch.where(mask[idx], torch.tensor(target, dtype=rows.dtype), rows)

        ctx.dataset = dataclasses.replace(ds, x_train=_Rows(ds.x_train, x_of), y_train=_Rows(ds.y_train, y_of))

    def on_update(self, task: Any, update: torch.Tensor, num_examples: int) -> tuple[torch.Tensor, int]:
        return (update * self.params["scale"] if self.params["scale"] != 1.0 else update), num_examples

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_mask": None}


def backdoor_success(model: torch.nn.Module, ds: Dataset, attack: Backdoor, batch_size: int = 1024) -> float | None:
    """Share of the test samples of other classes that the model assigns to the target once stamped."""
    target = attack.params["target"]
    keep = torch.nonzero(ds.y_test != target).flatten()
    if len(keep) == 0:
        return None
    hits = 0
    model.eval()
    with torch.no_grad():
        for b in range(0, len(keep), batch_size):
            x = stamp(ds.x_test[keep[b : b + batch_size]], attack.params["size"])
            hits += int((model(ds.features(x)).argmax(1) == target).sum())
    return hits / len(keep)
