"""Loading the extension named by the configuration.

Where it comes from:

* ``KURA_EXTENSION_SCRIPT_PATH=/etc/kura/policy.py``: the file is executed
  as a fresh module (it need not be on ``sys.path``);
* ``KURA_EXTENSION_MODULE=package.module``: the module is imported;
* ``KURA_EXTENSION_MODULE=package.module:attr``: ``attr`` of that module.

What the extension is, once found:

* a **module** with a ``setup(host)`` function: whatever ``setup`` returns,
  or the module itself when it returns ``None``;
* a module without ``setup``: the module (its top-level functions are the
  hooks);
* an attribute that is a **class or function**: called with the host (a
  class whose ``__init__`` takes the host, or a factory);
* any other attribute: the object itself.

The hooks are then the object's ``authenticate``, ``authorize`` and
``response_headers`` attributes, whichever exist. ``setup`` and factories
run synchronously at start-up. Every failure raises
:class:`~kura.auth.errors.ExtensionLoadError` naming the variable, the file
or module and the exception, and the node refuses to start.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.machinery
import importlib.util
import inspect
import os
import sys
import types
from typing import Any

import attrs
from twisted.logger import Logger

from kura.config.extension import MODULE, SCRIPT_PATH, ExtensionConfig

from .errors import ExtensionLoadError
from .hooks import ExtensionHooks

log = Logger(namespace="kura.auth")

EXTENSION_LOADED = "authorization extension loaded from {source} (hooks: {hooks})"
EXTENSION_EMPTY = "authorization extension {source} defines no hooks: every request is allowed"


@attrs.frozen
class LoadedExtension:
    """An extension ready to run.

    Attributes:
        hooks: the hooks it provides.
        fingerprint: identifies the code (part of every cache key).
        source: where it came from, for messages.
    """

    hooks: ExtensionHooks
    fingerprint: str
    source: str

    @classmethod
    def of(
        cls, extension: object, *, source: str = "object", fingerprint: str = ""
    ) -> LoadedExtension:
        """Wrap an extension object built in code (tests, embedding).

        Raises:
            TypeError: an attribute named like a hook is not callable.
        """
        return cls(ExtensionHooks.of(extension), fingerprint or source, source)


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


def _exec_file(path: str) -> tuple[types.ModuleType, str]:
    try:
        with open(path, "rb") as handle:
            code = handle.read()
    except OSError as error:
        raise ExtensionLoadError(
            f"{SCRIPT_PATH.name}: cannot read {path!r}: {_describe(error)}"
        ) from error
    fingerprint = hashlib.sha256(code).hexdigest()
    stem = "".join(c if c.isalnum() else "_" for c in os.path.splitext(os.path.basename(path))[0])
    name = f"kura_extension_{stem}_{fingerprint[:12]}"
    loader = importlib.machinery.SourceFileLoader(name, path)
    spec = importlib.util.spec_from_loader(name, loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    # Registered while it runs: dataclasses, pickling and typing.get_type_hints
    # look classes' modules up in sys.modules.
    sys.modules[name] = module
    try:
        loader.exec_module(module)
    except (KeyboardInterrupt, GeneratorExit):
        raise
    except BaseException as error:  # SyntaxError, ImportError, SystemExit, ...
        del sys.modules[name]
        raise ExtensionLoadError(
            f"{SCRIPT_PATH.name}: extension file {path!r} failed to import: {_describe(error)}"
        ) from error
    return module, fingerprint


def _import_target(spec: str) -> tuple[object, str]:
    module_name, _, attribute = spec.partition(":")
    try:
        target: object = importlib.import_module(module_name)
        for part in attribute.split(".") if attribute else ():
            target = getattr(target, part)
    except (KeyboardInterrupt, GeneratorExit):
        raise
    except BaseException as error:
        raise ExtensionLoadError(
            f"{MODULE.name}: cannot load {spec!r}: {_describe(error)}"
        ) from error
    digest = hashlib.sha256(spec.encode("utf-8"))
    module_file = getattr(sys.modules.get(module_name), "__file__", None)
    if module_file:
        try:
            with open(module_file, "rb") as handle:
                digest.update(handle.read())
        except OSError:
            pass  # the spec alone still identifies it
    return target, digest.hexdigest()


def _instantiate(target: object, host: Any, where: str) -> object:
    """Apply the ``setup``/factory rules of the module docstring."""
    try:
        if isinstance(target, types.ModuleType):
            setup = getattr(target, "setup", None)
            made = setup(host) if callable(setup) else None
            extension = target if made is None else made
        elif isinstance(target, type) or inspect.isfunction(target):
            extension = target(host)
        else:
            extension = target
    except (KeyboardInterrupt, GeneratorExit):
        raise
    except BaseException as error:
        raise ExtensionLoadError(f"{where}: setup failed: {_describe(error)}") from error
    if inspect.isawaitable(extension):
        if inspect.iscoroutine(extension):
            extension.close()
        raise ExtensionLoadError(f"{where}: setup must return the extension, not an awaitable")
    return extension


def load_extension(config: ExtensionConfig, host: Any) -> LoadedExtension:
    """Load the extension ``config`` names, handing ``host`` to its setup.

    Raises:
        ExtensionLoadError: the file or module cannot be loaded, its setup
            raised, or a hook attribute is not callable.
        ValueError: ``config`` names no extension.
    """
    if config.script_path is not None:
        module, fingerprint = _exec_file(config.script_path)
        target: object = module
        source = f"{SCRIPT_PATH.name}={config.script_path}"
    elif config.module is not None:
        target, fingerprint = _import_target(config.module)
        source = f"{MODULE.name}={config.module}"
    else:
        raise ValueError("the configuration names no extension")
    extension = _instantiate(target, host, source)
    try:
        hooks = ExtensionHooks.of(extension)
    except TypeError as error:
        raise ExtensionLoadError(f"{source}: {error}") from error
    present = [name for name, hook in attrs.asdict(hooks, recurse=False).items() if hook]
    if present:
        log.info(EXTENSION_LOADED, source=source, hooks=", ".join(present))
    else:
        log.warn(EXTENSION_EMPTY, source=source)
    return LoadedExtension(hooks, fingerprint, source)
