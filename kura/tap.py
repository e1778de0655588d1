"""``twistd kura``: options, and the service for twistd to run.

Options override the environment: each one is written over the matching
``KURA_*`` variable before the configuration is parsed, so there is exactly
one parser and one set of rules.
"""

from __future__ import annotations

import os
import signal
import sys
import textwrap
from collections.abc import Mapping
from typing import Any, cast

from twisted.application.service import IService
from twisted.internet.interfaces import IReactorCore, IReactorFromThreads, IReactorTime
from twisted.logger import ILogObserver, Logger
from twisted.python import usage
from twisted.python.components import Componentized

import kura
from kura.config import VARIABLES, ConfigError, KuraConfig
from kura.config.environ import unknown_variables
from kura.objectstore.client import ObjectStoreSetupError
from kura.service import KuraNode
from kura.telemetry.logs import flush_logs, observer_for
from kura.web.event_dispatch import dispatch_without_log_context

log = Logger(namespace="kura.config")

#: Option name → the variable it overrides.
OVERRIDES = {
    "port": "KURA_PORT",
    "internal-port": "KURA_INTERNAL_PORT",
    "data-dir": "KURA_DATA_DIR",
    "tmp-dir": "KURA_TMP_DIR",
    "tenant-id": "KURA_TENANT_ID",
}


#: The variables ``twistd kura --help`` lists (every one: docs/configuration.md).
COMMON_VARIABLES = (
    "KURA_PORT",
    "KURA_DATA_DIR",
    "KURA_TENANT_ID",
    "KURA_CAS_CAPACITY_BYTES",
    "KURA_PEERS",
    "KURA_PEER_SECRET",
    "KURA_NODE_URL",
    "KURA_PUBLIC_TLS_CERT_PATH",
    "KURA_AUTH_WRITE_TOKENS",
    "KURA_EXTENSION_SCRIPT_PATH",
)


def _common_variables() -> str:
    meanings = {variable.name: variable.meaning for variable in VARIABLES}
    return "\n".join(
        f"  {name}\n      {textwrap.shorten(meanings[name], 74, placeholder=' ...')}"
        for name in COMMON_VARIABLES
    )


class Options(usage.Options):
    """Command-line options of ``twistd kura`` (see docs/configuration.md)."""

    synopsis = "Usage: twistd [twistd options] kura [options]"
    longdesc = (
        "Runs a kura cache node. It is configured by KURA_* environment variables, every "
        "one documented in docs/configuration.md (python -m kura.config prints it); the "
        "options above override their variables."
    )

    def getUsage(self, width: int | None = None) -> str:
        """twistd's usage, then the most common variables (kept as laid out)."""
        return f"{super().getUsage(width)}\nThe most common variables:\n{_common_variables()}\n"

    optParameters = [
        ["port", None, None, "Public HTTP port (KURA_PORT)."],
        ["internal-port", None, None, "Peer plane port (KURA_INTERNAL_PORT)."],
        ["data-dir", "d", None, "Data directory (KURA_DATA_DIR)."],
        ["tmp-dir", None, None, "Staging directory (KURA_TMP_DIR)."],
        ["tenant-id", None, None, "The tenant this node serves (KURA_TENANT_ID)."],
    ]

    def opt_version(self) -> None:
        """Print kura's version and exit."""
        print(f"kura {kura.__version__}")
        raise SystemExit(0)


def environment_with(options: Mapping[str, Any], environ: Mapping[str, str]) -> dict[str, str]:
    """``environ`` with every given option written over its variable."""
    merged = dict(environ)
    for option, variable in OVERRIDES.items():
        value = options.get(option)
        if value is not None:
            merged[variable] = str(value)
    return merged


class TwistdNode(KuraNode):
    """A node run by twistd: kura's log observer, signal handling and event dispatch
    (:func:`~kura.web.event_dispatch.dispatch_without_log_context`).

    ``SIGUSR1`` starts draining; ``SIGTERM``/``SIGINT`` drain, wait for
    in-flight transfers (bounded by ``KURA_DRAIN_COMPLETION_TIMEOUT_MS``) and
    stop the reactor, so the process exits 0 instead of dying by the signal.
    """

    def startService(self) -> None:
        dispatch_without_log_context(self.reactor)
        super().startService()
        self.started.addErrback(self._exit_nonzero_after_shutdown)
        IReactorCore(self.reactor).callWhenRunning(self._install_signal_handlers)

    def _exit_nonzero_after_shutdown(self, failure: Any) -> None:
        # twistd exits 0 once the reactor stops; a node that could not start
        # must look like the crash it is to its supervisor.
        def exit_failed() -> None:
            flush_logs()  # os._exit skips atexit, which would write the queued lines
            sys.stdout.flush()
            os._exit(1)

        IReactorCore(self.reactor).addSystemEventTrigger("after", "shutdown", exit_failed)

    def _install_signal_handlers(self) -> None:
        threads = IReactorFromThreads(self.reactor)

        def on_drain(signum: int, frame: Any) -> None:
            threads.callFromThread(self.drain)

        def on_stop(signum: int, frame: Any) -> None:
            threads.callFromThread(self.shutdown)

        signal.signal(signal.SIGUSR1, on_drain)
        signal.signal(signal.SIGTERM, on_stop)
        signal.signal(signal.SIGINT, on_stop)

    def setServiceParent(self, parent: Any) -> None:
        # twistd asks the application for an ILogObserver before it starts
        # logging; this is the one hook a plugin has to choose the format.
        if isinstance(parent, Componentized):
            parent.setComponent(ILogObserver, observer_for(self.config.log_format))
        super().setServiceParent(parent)


def makeService(options: Mapping[str, Any]) -> IService:
    """Build the node from the environment and ``options``.

    Exits with a message naming every bad variable when the configuration
    is invalid, or saying what is missing when the object store is
    configured without credentials.
    """
    # Imported here: importing the reactor installs it, and twistd picks
    # the reactor before it imports plugins' makeService.
    from twisted.internet import reactor  # noqa: PLC0415

    environ = environment_with(options, os.environ)
    # Logged before the observer starts: twistd's log beginner buffers them.
    for warning in unknown_variables(environ, (variable.name for variable in VARIABLES)):
        log.warn("{warning}", warning=warning)
    try:
        config = KuraConfig.from_environ(environ)
        # Building the node loads the extension: a broken one stops start-up here.
        return TwistdNode(config, cast(IReactorTime, reactor))
    except ConfigError as error:
        raise SystemExit(f"kura: invalid configuration: {error}") from None
    except ObjectStoreSetupError as error:
        raise SystemExit(f"kura: object store: {error}") from None
