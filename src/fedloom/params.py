"""Named parameters <-> one flat float32 vector.

Everything between local training and the server optimizer (aggregation, compression, clipping, secure
masking) works on flat vectors; `ParamSpec` is the only place that knows how a model's `state_dict` maps
onto them. Integer buffers (e.g. BatchNorm's `num_batches_tracked`) travel as float32 and are cast back.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save


@dataclass(frozen=True)
class ParamEntry:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    offset: int
    numel: int


class ParamSpec:
    """Names, shapes, dtypes and offsets of a flat parameter vector."""

    def __init__(self, entries: list[ParamEntry]):
        self.entries = entries
        self.size = sum(e.numel for e in entries)
        self._by_name = {e.name: e for e in entries}

    @classmethod
    def from_state(cls, state: Mapping[str, torch.Tensor]) -> ParamSpec:
        entries, offset = [], 0
        for name, t in state.items():
            n = t.numel()
            entries.append(ParamEntry(name, tuple(t.shape), t.dtype, offset, n))
            offset += n
        return cls(entries)

    @classmethod
    def from_model(cls, model: torch.nn.Module) -> ParamSpec:
        return cls.from_state(model.state_dict())

    @property
    def names(self) -> list[str]:
        return [e.name for e in self.entries]

    def __getitem__(self, name: str) -> ParamEntry:
        return self._by_name[name]

    def __len__(self) -> int:
        return len(self.entries)

    def hash(self) -> str:
        """Short fingerprint; the wire header carries it so mismatched models are refused."""
        desc = [(e.name, list(e.shape), str(e.dtype)) for e in self.entries]
        return hashlib.sha256(json.dumps(desc).encode()).hexdigest()[:16]

    def flatten(self, state: Mapping[str, torch.Tensor]) -> torch.Tensor:
        missing = [e.name for e in self.entries if e.name not in state]
        if missing:
            raise KeyError(f"state is missing parameters: {', '.join(missing[:5])}")
        out = torch.empty(self.size, dtype=torch.float32)
        for e in self.entries:
            out[e.offset : e.offset + e.numel] = state[e.name].detach().reshape(-1).to(torch.float32)
        return out

    def unflatten(self, vec: torch.Tensor) -> dict[str, torch.Tensor]:
        if vec.numel() != self.size:
            raise ValueError(f"vector has {vec.numel()} values, spec expects {self.size}")
        return {
            e.name: vec[e.offset : e.offset + e.numel].reshape(e.shape).to(e.dtype) for e in self.entries
        }

    def float_mask(self) -> torch.Tensor:
        """True where the entry is a floating-point tensor (integer buffers are not averaged as updates)."""
        mask = torch.zeros(self.size, dtype=torch.bool)
        for e in self.entries:
            if e.dtype.is_floating_point:
                mask[e.offset : e.offset + e.numel] = True
        return mask


def model_vector(model: torch.nn.Module, spec: ParamSpec) -> torch.Tensor:
    return spec.flatten(model.state_dict())


def load_vector(model: torch.nn.Module, spec: ParamSpec, vec: torch.Tensor) -> None:
    model.load_state_dict(spec.unflatten(vec), strict=True)


class ReusedBuffer:
    """One tensor lent out at a time, lent again only after its holder has returned it.

    A round's stacked updates can be 100 MB, and a fresh allocation that size costs more in page faults than
    the arithmetic done on it. Whether the memory is free is never guessed (counting references to the tensor
    object misses its `.detach()`, `.numpy()` and storage, which share the memory without referring to it):
    `get` lends the tensor and `release` is the holder's statement that neither it nor anything sharing its
    memory is used any more. A `get` while the last tensor is still lent allocates a fresh one and leaves the
    lent one to its holder.
    """

    def __init__(self) -> None:
        self._tensor: torch.Tensor | None = None
        self._lent = False

    @property
    def lent(self) -> bool:
        return self._lent

    def get(self, *shape: int) -> torch.Tensor:
        t = self._tensor
        if t is None or self._lent or tuple(t.shape) != shape:
            t = torch.empty(shape)
        self._tensor, self._lent = t, True
        return t

    def release(self) -> None:
        """The tensor last handed out, and every view of it, will not be read or written again by its holder."""
        self._lent = False

    def clear(self) -> None:
        self._tensor, self._lent = None, False


def stack_rows(rows: list[torch.Tensor], buffer: ReusedBuffer | None = None) -> torch.Tensor:
    """`torch.stack(rows)` of equal-length float32 vectors, without copying when they already are consecutive
    rows of one contiguous matrix (the vectorized engine's updates), else into `buffer` when given: the result is
    then lent from it, and the caller `release`s the buffer once it is done with the result."""
    first = rows[0]
    n, k = first.numel(), len(rows)
    step = n * first.element_size()
    if first.dim() == 1 and all(
        r.dim() == 1 and r.numel() == n and r.dtype == first.dtype and r.is_contiguous()
        and r.untyped_storage().data_ptr() == first.untyped_storage().data_ptr()
        and r.data_ptr() == first.data_ptr() + i * step for i, r in enumerate(rows)
    ):
        return first.as_strided((k, n), (n, 1))
    if buffer is None or first.dtype != torch.float32:
        return torch.stack(rows)
    return torch.stack(rows, out=buffer.get(k, n))


def save_tensors(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], metadata: dict | None = None) -> None:
    """Atomic safetensors write: a crash never leaves a half-written checkpoint under `path`, and a failed write
    (a full disk) is an OSError naming the file, with the partial temporary file removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    meta = {k: str(v) for k, v in (metadata or {}).items()}
    data = save({k: v.contiguous() for k, v in tensors.items()}, metadata=meta)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise OSError(e.errno, f"cannot write checkpoint {path}: {e.strerror}", str(path)) from None


def load_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    return load_file(str(path))
