"""Load a user's object (a reward, an environment, a tool) from an import path or a file path.

    load_object("my_pkg.envs:Maze")            # importlib.import_module("my_pkg.envs").Maze
    load_object("my_rewards.py:score")         # the file ./my_rewards.py, its `score`
    load_object("/abs/path/my_rewards.py:score")

A spec is `<module or file>:<attribute>` (a dotted attribute is followed: `mod:Class.method`).
A file path ends in `.py`; a relative one is looked up in the current directory, then in each
`sys.path` entry: in a Ray job the working directory is both the driver's cwd and on the
workers' `sys.path`, so a file uploaded with the job (`align.launch --working-dir`) is found by
the driver and by every worker alike. The registries (`rewards.get_reward`, `align.envs.get_env`,
`align.envs.tools.get_tool`) call this for any name that contains a `:`, so a user's own code
plugs in from the config (`reward.name=my_rewards.py:score`) without editing this package.

Standard library only, like the rest of `rewards`.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import sys
from pathlib import Path
from typing import Any


def is_spec(name: str) -> bool:
    """True for `module:attr` / `file.py:attr` (a registry name never contains a colon)."""
    return isinstance(name, str) and ":" in name


def load_object(spec: str) -> Any:
    """The object `spec` names; ImportError / AttributeError / FileNotFoundError name the spec."""
    where, sep, attr = spec.rpartition(":")
    if not sep or not where or not attr:
        raise ValueError(f"{spec!r}: expected '<module or file.py>:<attribute>', e.g. 'my_rewards.py:score'")
    module = _load_file(where, spec) if where.endswith(".py") else _import(where, spec)
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise AttributeError(f"{spec!r}: {getattr(module, '__file__', where)} has no attribute {attr!r}") from None
    return obj


def _import(name: str, spec: str):
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as err:
        raise ImportError(f"{spec!r}: cannot import module {name!r} ({err}); is it installed or on PYTHONPATH? "
                          "A file is given as path/to/file.py:attr") from err


def find_file(path: str) -> Path:
    """An absolute path as it is; a relative one in the cwd, then in each `sys.path` entry."""
    p = Path(os.path.expanduser(path))
    candidates = [p] if p.is_absolute() else [Path.cwd() / p, *(Path(e or ".") / p for e in sys.path)]
    for c in candidates:
        if c.is_file():
            return c.resolve()
    raise FileNotFoundError(f"{path!r}: no such file in {os.getcwd()} or on sys.path (a Ray job finds the files "
                            "of its working directory; pass an absolute path otherwise)")


def _load_file(path: str, spec: str):
    """Import a file once per process under a name derived from its absolute path, registered in
    `sys.modules` (so dataclasses, pickling by reference and repeated loads work)."""
    file = find_file(path)
    name = f"_align_user_{file.stem}_{hashlib.sha1(str(file).encode()).hexdigest()[:10]}"
    if name in sys.modules:
        return sys.modules[name]
    module_spec = importlib.util.spec_from_file_location(name, file)
    if module_spec is None or module_spec.loader is None:
        raise ImportError(f"{spec!r}: cannot load {file} as a Python module")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    try:
        module_spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def build(obj: Any, options: dict[str, Any], spec: str) -> Any:
    """A loaded class is constructed with `options`; a loaded function is used as is, its
    `options` (if any) bound as keyword arguments of every call (`functools.partial`)."""
    if isinstance(obj, type):
        return obj(**options)
    if options:
        if not callable(obj):
            raise TypeError(f"{spec!r} is not callable, so it cannot take options {sorted(options)}")
        import functools

        return functools.partial(obj, **options)
    return obj
