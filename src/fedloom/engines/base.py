"""What every engine provides: run a batch of client tasks, return each one's message or its failure."""

from __future__ import annotations

import os
import time
import traceback
from dataclasses import dataclass
from typing import Protocol

import torch

from ..client.work import ClientRuntime, ClientTask
from ..pipeline import wire


@dataclass
class ClientReply:
    """A client's message as the server receives it, its size on the wire, and the seconds its work took.

    A reply that crosses a process or machine boundary travels packed, as the wire bytes themselves, and
    the engine `unpack`s it on arrival; in process the message is handed over by `wire.passthrough`.
    Either way `nbytes` is the exact encoded size. Timing stays out of the bytes so that the bytes, and so
    the measured communication, are deterministic.
    """

    message: wire.Message | None
    nbytes: int
    seconds: float
    state: dict[str, torch.Tensor] | None = None  # the client's new private state, if its algorithm keeps one
    payload: bytes | None = None  # the wire bytes, while packed

    def unpack(self, spec_hash: str, sizes: tuple[int, ...] | None = None) -> ClientReply:
        """Decode the bytes; `sizes`: the vector lengths a reply may have (a header claiming another is refused
        before its payload is decoded, so a hostile size cannot make the server allocate for it)."""
        if self.message is not None:
            return self
        assert self.payload is not None
        msg = wire.decode(self.payload, expect_spec=spec_hash, expect_sizes=sizes)
        return ClientReply(msg, self.nbytes, self.seconds, self.state)


@dataclass
class ClientFailure:
    client_id: int
    traceback: str


class Engine(Protocol):
    name: str

    def check(self, runtime: ClientRuntime) -> None:
        """Refuse, before the run is recorded, an experiment this engine cannot execute (ConfigError)."""
        ...

    def fit(self, runtime: ClientRuntime, tasks: list[ClientTask]) -> list[ClientReply | ClientFailure]:
        """Run the tasks. A reply's update vector may be memory the engine lends (rows of a shared matrix): it is
        valid until this engine's next `fit`; a caller that keeps one longer clones it."""
        ...

    def close(self) -> None: ...


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity, e.g. a container's cpuset), not the machine's count."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def run_task(runtime: ClientRuntime, task: ClientTask, packed: bool = False) -> ClientReply | ClientFailure:
    """One client task wherever it runs: its reply timed, or its failure with the client's own traceback.

    `packed`: the reply leaves this process (worker processes, Ray), so it carries the encoded bytes.
    """
    t0 = time.perf_counter()
    try:
        result = runtime.run(task)
        if packed:
            data = wire.encode(result.message)
            message, nbytes, payload = None, len(data), data
        else:
            (message, nbytes), payload = wire.passthrough(result.message), None
    except Exception:  # noqa: BLE001 - the round logic decides: fail the round or drop the client
        return ClientFailure(task.client_id, traceback.format_exc())
    return ClientReply(message, nbytes, time.perf_counter() - t0, result.state, payload)


def balanced_batches(runtime: ClientRuntime, tasks: list[ClientTask], batches: int) -> list[list[int]]:
    """Task indices in `batches` groups of about equal work (samples x epochs, or steps x batch), largest first.

    Each task goes to the lightest group so far, longest task first (LPT): a group is one hand-off to a worker,
    so per-task overhead is paid per group, and the longest work starts first instead of leaving the other
    workers idle at the end of a round behind one big client.
    """
    def cost(t: ClientTask) -> int:
        steps = runtime.train.local_steps if t.steps is None else t.steps
        if steps:
            return steps * runtime.train.batch_size
        epochs = runtime.train.local_epochs if t.epochs is None else t.epochs
        return len(runtime.data.clients[t.client_id].train_idx) * epochs

    costs = [cost(t) for t in tasks]
    groups: list[list[int]] = [[] for _ in range(max(1, min(batches, len(tasks))))]
    loads = [0] * len(groups)
    for i in sorted(range(len(tasks)), key=lambda i: -costs[i]):
        g = loads.index(min(loads))
        groups[g].append(i)
        loads[g] += costs[i]
    return [g for _, g in sorted(zip(loads, groups, strict=True), key=lambda lg: -lg[0]) if g]


def unpacked(replies: list[ClientReply | ClientFailure], spec_hash: str,
             sizes: tuple[int, ...] | None = None) -> list[ClientReply | ClientFailure]:
    """Replies decoded on arrival; one whose bytes do not decode (truncated, unknown codec, out-of-range indices,
    NaN/Inf) becomes that client's failure with the reason, never an exception that takes the round down."""
    out: list[ClientReply | ClientFailure] = []
    for r in replies:
        if isinstance(r, ClientReply):
            try:
                r = r.unpack(spec_hash, sizes)
            except ValueError as e:
                r = ClientFailure(_client_of(r), f"refused the update of this client: {e}")
        out.append(r)
    return out


def _client_of(reply: ClientReply) -> int:
    """The client id a packed reply claims (its header may be what is corrupt: -1 then)."""
    try:
        return int(wire.decode_header(reply.payload or b"")["client"])
    except (ValueError, KeyError, TypeError):
        return -1
