"""Calling extension hooks: adapting an extension, deadlines, validation.

:meth:`ExtensionHooks.of` takes any object (a module, an instance) and picks
up whichever of ``authenticate``, ``authorize`` and ``response_headers`` it
has. :meth:`HookRunner.run` calls one hook under a deadline and checks the
type of what it returned; every way a hook can go wrong (it raises, its
Deferred fails, it outlives the deadline, it returns something else) comes
out as one exception, :class:`HookFailed`, so fail-closed handling lives in
one place.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import attrs
from twisted.internet.defer import CancelledError, Deferred, TimeoutError
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from kura.telemetry.metrics import KuraMetrics

from .results import Deny

log = Logger(namespace="kura.auth")

HOOK_RAISED = "extension {hook} hook failed"
HOOK_TIMED_OUT = "extension {hook} hook timed out after {timeout_ms} ms"
HOOK_INVALID = "extension {hook} hook returned {value!r}; expected {expected}"

HOOK_NAMES = ("authenticate", "authorize", "response_headers")

Hook = Callable[..., object]


@attrs.frozen
class ExtensionHooks:
    """The hooks one extension provides (``None`` where it has none)."""

    authenticate: Hook | None = None
    authorize: Hook | None = None
    response_headers: Hook | None = None

    @classmethod
    def of(cls, extension: object) -> ExtensionHooks:
        """The hooks of ``extension`` (module, instance, or any object).

        Raises:
            TypeError: an attribute named like a hook is not callable.
        """
        found: dict[str, Hook] = {}
        for name in HOOK_NAMES:
            hook = getattr(extension, name, None)
            if hook is None:
                continue
            if not callable(hook):
                raise TypeError(f"{name} must be callable, got {hook!r}")
            found[name] = hook
        return cls(**found)


class HookFailed(Exception):
    """A hook raised, timed out, or returned the wrong type.

    Attributes:
        hook: the hook's name.
        reason: ``error``, ``timeout`` or ``invalid``.
    """

    def __init__(self, hook: str, reason: str, detail: str) -> None:
        super().__init__(f"{hook} hook {reason}: {detail}")
        self.hook = hook
        self.reason = reason


async def _invoke(hook: Hook, args: tuple[object, ...]) -> object:
    result = hook(*args)
    if inspect.isawaitable(result):
        result = await result
    return result


class HookRunner:
    """Runs hooks under a deadline and records their outcome.

    Args:
        clock: the deadline's clock (``Deferred.addTimeout``).
        timeout_seconds: how long one hook call may take. A hook that
            blocks the reactor cannot be interrupted; the deadline bounds
            waiting (backend calls, Deferreds).
        metrics: ``kura_extension_hook_calls``/``_duration_seconds``.
    """

    def __init__(
        self, *, clock: IReactorTime, timeout_seconds: float, metrics: KuraMetrics
    ) -> None:
        self._clock = clock
        self._timeout = timeout_seconds
        self._metrics = metrics

    async def run(self, name: str, hook: Hook, expected: tuple[type, ...], *args: object) -> Any:
        """Call ``hook(*args)``; return its result if it is one of ``expected``.

        Raises:
            HookFailed: the hook raised, timed out or returned another type.
            CancelledError: the caller was cancelled (not the hook's fault;
                not counted).
        """
        started = self._clock.seconds()
        call: Deferred[object] = Deferred.fromCoroutine(_invoke(hook, args))
        call.addTimeout(self._timeout, self._clock)
        # A CancelledError may come from the caller (its client left) or
        # from inside the hook; only the first is not the hook's failure.
        caller_cancelled = False

        def cancel(waiter: Deferred[object]) -> None:
            nonlocal caller_cancelled
            caller_cancelled = True
            call.cancel()

        waiter: Deferred[object] = Deferred(cancel)
        call.addCallbacks(waiter.callback, waiter.errback)
        try:
            result = await waiter
        except TimeoutError:
            self._count(name, "timeout", started)
            log.warn(HOOK_TIMED_OUT, hook=name, timeout_ms=round(self._timeout * 1000))
            raise HookFailed(name, "timeout", f"no result within {self._timeout}s") from None
        except CancelledError:
            if caller_cancelled:
                raise
            self._count(name, "error", started)
            log.failure(HOOK_RAISED, Failure(), hook=name)
            raise HookFailed(name, "error", "CancelledError()") from None
        except (KeyboardInterrupt, GeneratorExit):
            raise
        except BaseException as error:
            # Anything else a hook does (including sys.exit) is its failure.
            self._count(name, "error", started)
            log.failure(HOOK_RAISED, Failure(), hook=name)
            raise HookFailed(name, "error", repr(error)) from error
        if not isinstance(result, expected):
            self._count(name, "invalid", started)
            wanted = " or ".join(t.__name__ for t in expected)
            log.warn(HOOK_INVALID, hook=name, value=result, expected=wanted)
            raise HookFailed(name, "invalid", f"returned {result!r}, expected {wanted}")
        self._count(name, "deny" if isinstance(result, Deny) else "ok", started)
        return result

    def _count(self, name: str, result: str, started: float) -> None:
        self._metrics.extension_hook_calls.labels(name, result).inc()
        self._metrics.extension_hook_duration.labels(name).observe(
            max(0.0, self._clock.seconds() - started)
        )
