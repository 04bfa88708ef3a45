"""The Ray engine: each client task is a Ray task, on a local Ray or on a cluster.

The runtime's pieces (dataset arrays, client index arrays, model skeleton, algorithm, configs) go into
the object store once per run, not once per client: a worker rebuilds the `ClientRuntime` from them the
first time it meets the run and keeps it, so later tasks pay only for the broadcast (itself put once per
round) and the client's own state. Dataset arrays travel as numpy, which Ray hands to workers on the
same node as read-only views of shared memory, so a node holds one copy of the data however many
workers it runs. The client computation is the one `SequentialEngine` runs; only the number of torch
threads may differ, so results match it to float tolerance.

Ray is optional: it is imported only when this engine is built (`pip install 'fedloom[ray]'`).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import pickle
import re
import socket
import traceback
import uuid
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..client.work import ClientRuntime, ClientTask
from ..config import EvalConfig, PipelineConfig, RayConfig, RunConfig, TrainConfig
from ..data.datasets import Dataset
from ..data.federated import ClientData, FederatedData
from ..errors import ConfigError
from ..params import load_vector
from .base import ClientFailure, ClientReply, run_task, unpacked, usable_cores

if TYPE_CHECKING:
    from ..algorithms import Algorithm

log = logging.getLogger(__name__)

# A crashed worker (segfault, OOM kill, lost node) is retried once: enough to ride out a lost node, while a
# client that crashes its worker every time fails fast instead of four times over.
CRASH_RETRIES = 1
_CONNECT_TIMEOUT_S = 5.0
_RAY_HINT = "pip install 'fedloom[ray]'"


# ---- what workers rebuild the runtime from ----------------------------------------------------------------

@dataclass
class RuntimeRecipe:
    """A `ClientRuntime` taken apart so it pickles small and its arrays stay zero-copy in the object store.

    The model travels as an instance holding the seeded initial weights (not the factory, whose closure
    may capture the whole dataset), and the dataset's tensors as numpy arrays, which Ray serializes out of
    band: a worker maps them from shared memory instead of unpickling a copy.
    """

    model: torch.nn.Module
    arrays: dict[str, np.ndarray]  # the Dataset fields that are tensors
    fields: dict[str, Any]  # the other Dataset fields
    clients: list[ClientData]
    partition: str
    train: TrainConfig
    algorithm: Algorithm
    evaluation: EvalConfig
    pipeline: PipelineConfig
    attack: Any = None  # simulated attackers (fedloom.attacks.Attack)

    @classmethod
    def of(cls, runtime: ClientRuntime) -> RuntimeRecipe:
        model = copy.deepcopy(runtime.model)
        load_vector(model, runtime.spec, runtime.initial)
        ds = runtime.data.dataset
        values = {f.name: getattr(ds, f.name) for f in dataclasses.fields(ds)}
        arrays = {k: v.detach().cpu().contiguous().numpy() for k, v in values.items() if isinstance(v, torch.Tensor)}
        fields = {k: v for k, v in values.items() if k not in arrays}
        return cls(model, arrays, fields, runtime.data.clients, runtime.data.partition, runtime.train,
                   runtime.algorithm, runtime.evaluation, runtime.pipeline_config, runtime.attack)

    def build(self) -> ClientRuntime:
        with warnings.catch_warnings():
            # Arrays from the object store are read-only shared memory. Torch warns because writing through
            # such a tensor is undefined; fedloom never writes to dataset tensors (batches are gathered by
            # index, which copies), so the views are safe and a per-worker copy of the data is avoided.
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            tensors = {k: torch.from_numpy(v) for k, v in self.arrays.items()}
        data = FederatedData(Dataset(**tensors, **self.fields), self.clients, self.partition)
        model = self.model
        runtime = ClientRuntime(lambda: model, data, self.train, self.algorithm, self.evaluation, self.pipeline)
        runtime.attack = self.attack
        return runtime


# ---- the worker side ------------------------------------------------------------------------------------

_RUNTIMES: OrderedDict[str, ClientRuntime] = OrderedDict()  # per worker process: token -> rebuilt runtime
_RUNTIMES_KEPT = 2  # runs a worker keeps rebuilt at once (a driver running runs back to back)


def _worker_runtime(token: str, recipe_ref: Any) -> ClientRuntime:
    """The run's runtime in this worker process, rebuilt from the object store the first time only."""
    runtime = _RUNTIMES.get(token)
    if runtime is None:
        import ray

        runtime = ray.get(recipe_ref).build()
        # The first optimizer a process builds imports torch._dynamo (about a second): pay it here, in the
        # one-off rebuild, so round 1's client seconds measure the client's work as later rounds' do.
        torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
        _RUNTIMES[token] = runtime
        while len(_RUNTIMES) > _RUNTIMES_KEPT:
            _RUNTIMES.popitem(last=False)
    _RUNTIMES.move_to_end(token)
    return runtime


def run_client(token: str, refs: list[Any], task: ClientTask, threads: int) -> ClientReply | ClientFailure:
    """One client task in a Ray worker: its reply, or its failure with the client's own traceback.

    `refs` is [recipe, broadcast] wrapped in a list so that Ray passes the references instead of
    resolving them: the recipe is fetched only when this worker has not rebuilt the runtime yet.
    The seconds cover the client's work only, like the sequential engine's, not the one-off rebuild.
    """
    try:
        import ray

        torch.set_num_threads(threads)
        runtime = _worker_runtime(token, refs[0])
        task = dataclasses.replace(task, broadcast=ray.get(refs[1]))
    except Exception:  # noqa: BLE001 - formatted here, in the worker, so the worker's own frames are kept
        return ClientFailure(task.client_id, traceback.format_exc())
    return run_task(runtime, task, packed=True)


# ---- resources ----------------------------------------------------------------------------------------

_IDS = re.compile(r"^\s*(\d+)\s*(?:-\s*(\d+)\s*)?$")


def parse_client_ids(spec: str) -> list[tuple[int, int]]:
    """'0-9,15' -> [(0, 9), (15, 15)]: inclusive ranges of client ids."""
    ranges = []
    for part in spec.split(","):
        m = _IDS.match(part)
        if not m or (m.group(2) is not None and int(m.group(2)) < int(m.group(1))):
            raise ConfigError(f"run.ray.client_class key '{spec}' is not a list of client ids or ranges",
                              "write ids and inclusive ranges, e.g. '0-9,15'")
        lo = int(m.group(1))
        ranges.append((lo, int(m.group(2)) if m.group(2) is not None else lo))
    return ranges


def task_options(resources: dict[str, float], default_cpus: float) -> dict[str, Any]:
    """A resource class as Ray task options: num_cpus / num_gpus / memory (bytes); other keys are custom."""
    opts: dict[str, Any] = {"num_cpus": resources.get("num_cpus", default_cpus)}
    if "num_gpus" in resources:
        opts["num_gpus"] = resources["num_gpus"]
    if "memory" in resources:
        opts["memory"] = int(resources["memory"])
    custom = {k: v for k, v in resources.items() if k not in ("num_cpus", "num_gpus", "memory")}
    if custom:
        opts["resources"] = custom
    return opts


def _demand(opts: dict[str, Any]) -> dict[str, float]:
    """Task options in the names Ray's nodes report their resources under."""
    out = {"CPU": opts["num_cpus"], "GPU": opts.get("num_gpus", 0), "memory": opts.get("memory", 0)}
    out.update(opts.get("resources", {}))
    return {k: v for k, v in out.items() if v}


def feasible(demand: dict[str, float], nodes: list[dict[str, float]]) -> bool:
    """Whether some single node has all of `demand` (a task never spans nodes)."""
    return any(all(node.get(k, 0) >= v for k, v in demand.items()) for node in nodes)


class ClientResources:
    """Which Ray options each client's task runs with: the default class or the one `client_class` names."""

    def __init__(self, cfg: RayConfig):
        default = task_options({}, cfg.num_cpus)
        self.classes = {"default": default} | {n: task_options(r, cfg.num_cpus) for n, r in cfg.classes.items()}
        self.ranges: list[tuple[int, int, str]] = []
        for key, name in cfg.client_class.items():
            for lo, hi in parse_client_ids(key):
                for a, b, other in self.ranges:
                    if lo <= b and a <= hi and other != name:
                        raise ConfigError(f"run.ray.client_class puts clients {max(a, lo)}-{min(b, hi)} in both "
                                          f"'{other}' and '{name}'", "give each client id one class")
                self.ranges.append((lo, hi, name))

    def class_of(self, client_id: int) -> str:
        return next((name for lo, hi, name in self.ranges if lo <= client_id <= hi), "default")

    def options(self, client_id: int) -> dict[str, Any]:
        return self.classes[self.class_of(client_id)]

    def infeasible(self, nodes: list[dict[str, float]]) -> list[str]:
        """Classes whose tasks no node of the cluster could ever run (they would wait forever)."""
        used = {"default", *(name for _, _, name in self.ranges)}
        return [n for n in self.classes if n in used and not feasible(_demand(self.classes[n]), nodes)]


# ---- the engine ---------------------------------------------------------------------------------------

def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise ConfigError("the ray engine needs Ray", hint=_RAY_HINT) from None
    return ray


def check_address(address: str) -> None:
    """Fail in seconds, with the address named, where Ray itself would wait 30 s (ray://) or hang (GCS)."""
    if address == "auto":
        return  # Ray looks it up locally and says at once when there is none
    hostport = address.removeprefix("ray://")
    host, sep, port = hostport.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ConfigError(f"run.ray.address '{address}' is not 'auto', 'ray://host:port' or 'host:port'",
                          "leave it unset to start a local Ray")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=_CONNECT_TIMEOUT_S):
            pass
    except OSError as e:
        raise ConfigError(f"cannot reach the Ray cluster at run.ray.address '{address}' ({e.strerror or e})",
                          "start it (`ray start --head`), check the host and port, or leave run.ray.address "
                          "unset to start a local Ray") from None


class RayEngine:
    """Client tasks as Ray tasks; results back in task order, failures as `ClientFailure`s."""

    name = "ray"

    def __init__(self, run: RunConfig):
        self.ray = ray = _import_ray()
        self.cfg = run.ray
        self.resources = ClientResources(run.ray)
        address = run.ray.address
        if address:
            check_address(address)
        self.owns = not ray.is_initialized()  # close() shuts down only a Ray this engine started
        if self.owns:
            try:
                if address:
                    ray.init(address=address, logging_level=logging.WARNING)
                else:
                    ray.init(address="local", num_cpus=run.workers or usable_cores(), include_dashboard=False,
                             logging_level=logging.WARNING)
            except (ConnectionError, TimeoutError, RuntimeError) as e:
                where = f"the Ray cluster at run.ray.address '{address}'" if address else "a local Ray"
                raise ConfigError(f"cannot start or join {where}: {e}",
                                  "check `ray status` on the cluster, or leave run.ray.address unset") from None
        self._check_resources()
        self._remote = ray.remote(run_client)
        self._runtime: ClientRuntime | None = None
        self._token = ""
        self._recipe_ref: Any = None

    def _check_resources(self) -> None:
        try:
            nodes = [n["Resources"] for n in self.ray.nodes() if n.get("Alive")]
        except Exception:  # noqa: BLE001 - a client connection that cannot list nodes: Ray will say if stuck
            return
        bad = self.resources.infeasible(nodes)
        if not bad:
            return
        what = ", ".join(f"'{n}' {self.resources.classes[n]}" for n in bad)
        if self.owns and not self.cfg.address:  # a local Ray never grows: those tasks would wait forever
            self.close()
            raise ConfigError(f"no node of the local Ray has the resources of class {what}",
                              "lower run.ray.num_cpus / run.ray.classes, or raise run.workers")
        log.warning("no node of the Ray cluster has the resources of class %s yet; its clients wait until one "
                    "joins (an autoscaler may add it)", what)

    def check(self, runtime: ClientRuntime) -> None:
        """Put the run's recipe in the object store now: one that cannot be pickled is refused before the run
        is recorded, instead of failing every client of round 1."""
        self._put_runtime(runtime)

    def _put_runtime(self, runtime: ClientRuntime) -> None:
        """Put the runtime's recipe in the object store, once per runtime (that is, once per run)."""
        if runtime is self._runtime:
            return
        try:
            self._recipe_ref = self.ray.put(RuntimeRecipe.of(runtime))
        except (TypeError, AttributeError, pickle.PicklingError) as e:  # what pickling raises
            raise ConfigError(f"the ray engine cannot ship this experiment to its workers: {e}",
                              "models and algorithms must pickle; define them at module level") from None
        self._token = uuid.uuid4().hex
        self._runtime = runtime

    def fit(self, runtime: ClientRuntime, tasks: list[ClientTask]) -> list[ClientReply | ClientFailure]:
        ray = self.ray
        self._put_runtime(runtime)
        broadcasts: dict[int, Any] = {}  # every task of a round shares one broadcast: put it once
        refs = []
        for task in tasks:
            if id(task.broadcast) not in broadcasts:
                broadcasts[id(task.broadcast)] = ray.put(task.broadcast)
            opts = self.resources.options(task.client_id)
            light = dataclasses.replace(task, broadcast=b"")
            threads = max(1, int(opts["num_cpus"]))
            call = self._remote.options(**opts, max_retries=CRASH_RETRIES, retry_exceptions=False)
            refs.append(call.remote(self._token, [self._recipe_ref, broadcasts[id(task.broadcast)]], light, threads))
        out: list[ClientReply | ClientFailure] = []
        try:
            for task, ref in zip(tasks, refs, strict=True):
                out.append(self._collect(task, ref))
        except BaseException:  # interrupted: do not leave the cluster busy with a round nobody waits for
            for ref in refs:
                ray.cancel(ref)
            raise
        return unpacked(out, runtime.spec_hash, runtime.reply_sizes)

    def _collect(self, task: ClientTask, ref: Any) -> ClientReply | ClientFailure:
        errors = self.ray.exceptions
        try:
            return self.ray.get(ref)
        except errors.RayError as e:  # not the client's code (that is caught in the worker): Ray's side failed
            died = (errors.WorkerCrashedError, errors.NodeDiedError, errors.OutOfMemoryError,
                    errors.LocalRayletDiedError, errors.ObjectLostError)
            why = ("its worker died (crash, out-of-memory kill or lost node)" if isinstance(e, died)
                   else "Ray could not run it")
            return ClientFailure(task.client_id, f"{e}\n{type(e).__name__}: the Ray task of client {task.client_id} "
                                 f"failed outside the client's code: {why}")

    def close(self) -> None:
        self._runtime = self._recipe_ref = None
        if self.owns and self.ray.is_initialized():
            self.ray.shutdown()
        self.owns = False
