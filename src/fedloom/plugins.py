"""Plug-ins: one way to add every kind of component, and three ways to load the code that adds them.

Each kind has a registry next to the code that uses it; the functions here are the public doors to them:

    fedloom.register_dataset(name, loader)     # data/custom.py
    fedloom.register_model(name, builder)      # models/zoo.py
    fedloom.register_algorithm(name, cls)      # algorithms/__init__.py
    fedloom.register_transform(name, factory)  # pipeline/transforms.py (pipeline.client = ["name:arg"])
    fedloom.register_aggregator(name, factory) # server/aggregators.py (server.aggregator = "name")

A registered name is then used like a built-in one. Registrations live in the process that made them, so the
code that makes them is loaded as a plug-in: a module name or a `.py` file listed in an experiment's
`plugins = [...]` (paths relative to the experiment file), given with `--plugin` on the command line, or
declared by an installed package in the `fedloom.plugins` entry-point group. Plug-ins are loaded before a
configuration is validated, and the resolved list (absolute paths) is stored with the run, so `fedloom
resume` loads them again.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import os
import sys
from collections.abc import Callable, Iterable
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path
from types import ModuleType
from typing import Any

from .data.custom import register_dataset
from .errors import ConfigError, FedloomError
from .models.zoo import register_model

ENTRY_POINT_GROUP = "fedloom.plugins"
_HINT = "a plug-in is an importable module name or a path to a .py file (relative to the experiment file)"

_loaded: dict[str, ModuleType] = {}  # resolved spec -> module, so a plug-in runs once per process
_entry_points_loaded = False


def register_algorithm(name: str, cls: type) -> None:
    """`server.algorithm = name` runs `cls(server_config, num_clients)`, a subclass of
    `fedloom.algorithms.Algorithm` (docs/extending.md, "Your own algorithm")."""
    from .algorithms import register_algorithm as register

    register(name, cls)


def register_transform(name: str, factory: Callable[[str | None], Any]) -> None:
    """`pipeline.client = ["name"]` or `["name:argument"]` applies `factory(argument or None)` to each client's
    update: an object with `name`, `init(size) -> state` and `apply(vector, state, ctx) -> (vector, state)`."""
    from .pipeline.transforms import register_transform as register

    _check_name("transform", name, ("clip",))
    if not callable(factory):
        raise ConfigError(f"register_transform('{name}', ...) needs a factory function (argument or None) -> "
                          f"transform, not {type(factory).__name__}")
    register(name, factory)


def register_aggregator(name: str, factory: Callable[..., Any]) -> None:
    """`server.aggregator = name` combines the round's updates with `factory()` (or `factory(params)` with
    `server.aggregator_params`, when it takes an argument): an object with `name`, `sees_clients` and
    `combine(updates, weights) -> aggregate`."""
    from .server.aggregators import register_aggregator as register
    from .server.robust import ROBUST

    _check_name("aggregator", name, ("mean", *ROBUST))
    if not callable(factory):
        raise ConfigError(f"register_aggregator('{name}', ...) needs a factory (a class or function), not "
                          f"{type(factory).__name__}")
    register(name, factory)


def _check_name(kind: str, name: Any, builtin: Iterable[str]) -> None:
    if not isinstance(name, str) or not name or name != name.strip() or ":" in name or "+" in name:
        raise ConfigError(f"a {kind} name must be a non-empty string without spaces around it, ':' or '+', "
                          f"not {name!r}")
    if name in set(builtin):
        raise ConfigError(f"'{name}' is a built-in {kind} name", "register yours under another name")


# ---- loading ------------------------------------------------------------------------------------------

def load_plugins(specs: Iterable[str] | None, base: str | os.PathLike | None = None) -> list[str]:
    """Import each plug-in once (a module name, or a `.py` path relative to `base`, default the current folder)
    and return the specs as they are stored with a run: module names as given, paths absolute.

    A plug-in that cannot be found or fails while it is imported is a ConfigError (exit 2) naming it and the
    error it raised."""
    if specs is None:
        return []
    if isinstance(specs, str) or not isinstance(specs, list | tuple):
        raise ConfigError(f"plugins must be a list of module names or .py paths, not {type(specs).__name__} "
                          f"{specs!r}", 'e.g. plugins = ["my_module", "plugins/clipped.py"]')
    root = Path(base) if base is not None else Path.cwd()
    resolved: list[str] = []
    for spec in specs:
        if not isinstance(spec, str) or not spec.strip():
            raise ConfigError(f"plugins: {spec!r} is not a module name or a .py path", _HINT)
        key = _resolve(spec.strip(), root)
        if key not in _loaded:
            _loaded[key] = _import(spec, key, root)
        if key not in resolved:
            resolved.append(key)
    return resolved


def _is_path(spec: str) -> bool:
    return spec.endswith(".py") or os.sep in spec or "/" in spec


def _resolve(spec: str, base: Path) -> str:
    if not _is_path(spec):
        return spec
    path = Path(os.path.expanduser(spec))
    return str((path if path.is_absolute() else base / path).resolve())


def _import(spec: str, key: str, base: Path) -> ModuleType:
    if _is_path(key):
        return _import_file(spec, Path(key))
    try:
        return _imported(spec, lambda: importlib.import_module(key))
    except ModuleNotFoundError as e:  # the plug-in itself is missing (a module it imports is reported below)
        beside = base / (key.replace(".", "/") + ".py")
        hint = (f"{beside} exists: write '{beside.name}' to load it as a file" if beside.is_file()
                else f"{_HINT}; install its package or add its folder to PYTHONPATH")
        raise ConfigError(f"plug-in '{spec}' not found: no module named '{e.name}'", hint) from None


def _import_file(spec: str, path: Path) -> ModuleType:
    if path.suffix != ".py":
        raise ConfigError(f"plug-in '{spec}' is not a .py file", _HINT)
    if not path.is_file():
        raise ConfigError(f"plug-in file {path} does not exist" + (f" ('{spec}')" if spec != str(path) else ""),
                          "paths in an experiment's plugins are relative to the experiment file; on the command "
                          "line, to the current folder")
    # a stable, unique module name per file: pickling (parallel and ray engines) finds the module by it
    digest = hashlib.sha256(str(path).encode()).hexdigest()[:8]
    name = f"fedloom_plugin_{_identifier(path.stem)}_{digest}"
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or module_spec.loader is None:
        raise ConfigError(f"plug-in file {path} cannot be imported", _HINT)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    try:
        _imported(spec, lambda: module_spec.loader.exec_module(module), path)  # type: ignore[union-attr]
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module


def _imported(spec: str, load: Callable[[], Any], path: Path | None = None) -> Any:
    """`load()`, with what the plug-in's own code raises turned into one ConfigError naming the plug-in. A
    missing plug-in module passes through (the caller names it); a module the plug-in imports is its error."""
    try:
        return load()
    except ModuleNotFoundError as e:
        if path is None and e.name is not None and (spec.strip() == e.name or spec.strip().startswith(e.name + ".")):
            raise
        raise _failed(spec, e, path) from None
    except FedloomError as e:  # e.g. a registration it made was refused
        raise ConfigError(f"plug-in '{spec}': {e.message}", e.hint) from None
    except Exception as e:  # anything else its code raised while being imported (SyntaxError included)
        raise _failed(spec, e, path) from None


def _identifier(stem: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in stem)


def _failed(spec: str, e: BaseException, path: Path | None) -> ConfigError:
    where = f" (line {e.lineno})" if isinstance(e, SyntaxError) and e.lineno else ""
    tb = e.__traceback__
    while tb is not None:  # the last line of the plug-in file itself that the error went through
        if path is not None and tb.tb_frame.f_code.co_filename == str(path):
            where = f" ({path.name}, line {tb.tb_lineno})"
        tb = tb.tb_next
    return ConfigError(f"plug-in '{spec}' failed to import: {type(e).__name__}: {e}{where}",
                       "fix the plug-in (run with --debug for the traceback), or remove it from plugins / --plugin")


def load_entry_points() -> list[str]:
    """Load, once per process, every plug-in installed packages declare in the `fedloom.plugins` entry-point
    group: an entry naming a module is imported (importing registers), one naming a callable is called once.
    Returns the entry names loaded."""
    global _entry_points_loaded
    if _entry_points_loaded:
        return []
    _entry_points_loaded = True  # a failing entry is reported once, not at every config load
    names = []
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        _load_entry_point(ep)
        names.append(ep.name)
    return names


def _load_entry_point(ep: EntryPoint) -> None:
    what = f"entry point '{ep.name}' ({ep.value}) of group {ENTRY_POINT_GROUP}"
    try:
        target = ep.load()
        if callable(target) and not inspect.ismodule(target):
            target()
    except FedloomError as e:
        raise ConfigError(f"plug-in {what}: {e.message}", e.hint) from None
    except Exception as e:
        raise ConfigError(f"plug-in {what} failed to load: {type(e).__name__}: {e}",
                          "fix or uninstall the package that declares it (run with --debug for the traceback)"
                          ) from None


def ship_by_value() -> None:
    """Ray workers are fresh processes that cannot import a plug-in loaded from a file (its module name exists
    only here): when Ray is in use, such modules are pickled by value instead, so their classes reach them."""
    if "ray" not in sys.modules:
        return
    from ray import cloudpickle

    for key, module in _loaded.items():
        if _is_path(key):
            cloudpickle.register_pickle_by_value(module)


def loaded_modules() -> dict[str, ModuleType]:
    """The plug-ins loaded in this process, by their resolved spec."""
    return dict(_loaded)


__all__ = ["ENTRY_POINT_GROUP", "load_entry_points", "load_plugins", "loaded_modules", "register_aggregator",
           "register_algorithm", "register_dataset", "register_model", "register_transform"]
