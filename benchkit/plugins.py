"""Plugins: the user's own modules, imported before any config is built, in every process that runs one.

A plugin is any Python module that registers something in a benchkit registry (a criterion, a
granularity, a scope, a timing, a model, a dataset, an optimiser, a schedule, an init) when imported::

    # my_criterion.py
    from benchkit.pruning.criteria import CRITERIA, Criterion, loss_gradients

    @CRITERIA.register("fisher")
    class Fisher(Criterion):
        ...

Three ways to load one, all imported before the config is validated, in the sweep's own process and
in every worker (pool workers and Ray tasks import them from the config they receive):

* ``plugins: [my_pkg.pruning, ./my_criterion.py]`` at the top of a run or sweep YAML: module names,
  or paths to ``.py`` files relative to the YAML file;
* ``--plugin MODULE_OR_FILE`` on the command line (repeatable), paths relative to the working directory;
* an installed package declaring an entry point in the ``benchkit.plugins`` group (pyproject.toml:
  ``[project.entry-points."benchkit.plugins"] fisher = "my_pkg.pruning"``): loaded automatically, once
  per process, the first time a registry misses a name or a config is built. The entry point may name
  a module (imported) or a function (called with no arguments).

Module names are imported as Python would, with the working directory first on ``sys.path`` (as
``python -m`` does). On a Ray cluster of several machines every node must be able to import the
module: install it (an entry point then needs no config at all) or ship it with Ray's runtime_env.

This module imports nothing from benchkit, so every layer may call it.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import importlib.util
import os
import sys
import threading
import traceback
from collections.abc import Iterable
from pathlib import Path
from types import ModuleType

ENTRY_POINT_GROUP = "benchkit.plugins"


class PluginError(ImportError):
    """A plugin that cannot be found or fails while importing; the message names it and why."""


_LOCK = threading.RLock()
_ENTRY_POINTS_LOADED = False
_ENTRY_POINTS_LOADING = False


def is_path(spec: str) -> bool:
    """A plugin given as a file (``./x.py``, ``plugins/x.py``, ``/abs/x.py``), not a module name."""
    return spec.endswith(".py") or "/" in spec or os.sep in spec or spec.startswith(".")


def resolve_specs(specs: Iterable[str], base: str | Path | None = None) -> list[str]:
    """Plugin specs with their file paths made absolute (relative to ``base``, default the working
    directory), so that workers with another working directory find the same files. Module names stay."""
    out: list[str] = []
    for spec in specs:
        spec = str(spec).strip()
        if not spec:
            continue
        if is_path(spec):
            p = Path(spec).expanduser()
            spec = str((Path(base) / p if base is not None and not p.is_absolute() else p).resolve())
        if spec not in out:
            out.append(spec)
    return out


def _module_name_for(path: Path) -> str:
    """A stable module name for a plugin file, unique per file (two ``plugin.py`` in two folders differ)."""
    digest = hashlib.sha256(str(path).encode()).hexdigest()[:8]
    stem = "".join(c if c.isalnum() else "_" for c in path.stem)
    return f"benchkit_plugin_{stem}_{digest}"


def _short_error(e: BaseException) -> str:
    """The exception and the plugin's own line where it was raised (not benchkit's or importlib's frames)."""
    frames = [f for f in traceback.extract_tb(e.__traceback__)
              if "importlib" not in f.filename and not f.filename.endswith(("plugins.py", "registry.py"))]
    where = f" (at {frames[-1].filename}:{frames[-1].lineno})" if frames else ""
    return f"{type(e).__name__}: {e}{where}"


def _import_file(path: Path) -> ModuleType:
    if not path.is_file():
        raise PluginError(f"plugin file {path} does not exist" if not path.exists() else
                          f"plugin {path} is not a file; give a .py file or a module name")
    name = _module_name_for(path)
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise PluginError(f"plugin {path} cannot be imported as Python (is it a .py file?)")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # registered first: dataclasses and pickling look the module up by name
    try:
        spec.loader.exec_module(module)
    except BaseException as e:
        sys.modules.pop(name, None)
        if isinstance(e, PluginError):
            raise
        if isinstance(e, Exception):
            raise PluginError(f"plugin {path} failed to import: {_short_error(e)}") from e
        raise
    return module


def _import_module(name: str) -> ModuleType:
    if name in sys.modules:
        return sys.modules[name]
    cwd = os.getcwd()
    added = cwd not in sys.path
    if added:
        sys.path.insert(0, cwd)  # as `python -m` would have it; the console script does not
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name is not None and (name == e.name or name.startswith(e.name + ".")):
            raise PluginError(f"plugin module {name!r} not found (looked on sys.path and in {cwd}); give the "
                              "module's importable name, or the path to its .py file (./my_plugin.py)") from e
        raise PluginError(f"plugin module {name!r} failed to import: {_short_error(e)}") from e
    except PluginError:
        raise
    except Exception as e:  # noqa: BLE001 - a plugin's own error, or a name clash: say which plugin
        raise PluginError(f"plugin module {name!r} failed to import: {_short_error(e)}") from e
    finally:
        if added and cwd in sys.path:
            sys.path.remove(cwd)


def load_plugins(specs: Iterable[str] = (), base: str | Path | None = None) -> list[ModuleType]:
    """Import the installed entry-point plugins (once per process), then ``specs``: module names or
    ``.py`` paths (relative to ``base``). Importing is idempotent: a plugin already imported is not run
    again. Raises :class:`PluginError` naming the plugin and its problem."""
    load_entry_point_plugins()
    modules = []
    with _LOCK:
        for spec in resolve_specs(specs, base):
            modules.append(_import_file(Path(spec)) if is_path(spec) else _import_module(spec))
    return modules


def entry_points() -> list[importlib.metadata.EntryPoint]:
    return sorted(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda ep: ep.name)


def load_entry_point_plugins() -> None:
    """Load every ``benchkit.plugins`` entry point of the installed packages, once per process."""
    global _ENTRY_POINTS_LOADED, _ENTRY_POINTS_LOADING
    if _ENTRY_POINTS_LOADED or _ENTRY_POINTS_LOADING:  # loading: a plugin's own registry look-ups
        return
    with _LOCK:
        if _ENTRY_POINTS_LOADED or _ENTRY_POINTS_LOADING:
            return
        _ENTRY_POINTS_LOADING = True
        try:
            for ep in entry_points():
                dist = getattr(ep, "dist", None)
                source = f"entry point {ep.name!r} = {ep.value!r}" + (
                    f" of the installed package {dist.name} {dist.version}" if dist is not None else "")
                try:
                    obj = ep.load()
                    if callable(obj) and not isinstance(obj, ModuleType):
                        obj()
                except PluginError as e:
                    raise PluginError(f"benchkit plugin {source}: {e}") from e
                except Exception as e:  # noqa: BLE001 - name it: the user did not write `plugins:`
                    raise PluginError(f"benchkit plugin {source} failed to load: {_short_error(e)} (uninstall "
                                      "or fix that package)") from e
            _ENTRY_POINTS_LOADED = True
        finally:
            _ENTRY_POINTS_LOADING = False
