"""The bounded hop from gRPC handler threads into the reactor (kura/reapi/bridge.py)."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Any

import grpc
import pytest
from twisted.internet.defer import Deferred, succeed

from kura.domain.errors import Forbidden, ServiceUnavailable, TooManyRequests
from kura.reapi.bridge import BridgeTimeout, ReactorBridge
from kura.reapi.cache import DigestMismatch
from kura.reapi.server import RpcAbort, status_of


class ThreadReactor:
    """Runs ``callFromThread`` work on one thread of its own, like a reactor would."""

    def __init__(self) -> None:
        self.calls: list[Callable[[], None]] = []
        self.ready = threading.Semaphore(0)
        self.stopped = False
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def callFromThread(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        self.calls.append(lambda: f(*args, **kwargs))
        self.ready.release()

    def run(self) -> None:
        while True:
            self.ready.acquire()
            if self.stopped:
                return
            self.calls.pop(0)()


class DeadReactor:
    """A reactor that has stopped: nothing handed to it ever runs."""

    def callFromThread(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        pass


def test_a_result_comes_back_to_the_calling_thread() -> None:
    reactor = ThreadReactor()
    bridge = ReactorBridge(reactor)  # type: ignore[arg-type]

    async def answer() -> int:
        return threading.get_ident()

    assert bridge.call(answer, timeout=5) == reactor.thread.ident
    assert bridge.call(lambda: succeed("deferred"), timeout=5) == "deferred"


def test_failures_are_raised_in_the_calling_thread() -> None:
    bridge = ReactorBridge(ThreadReactor())  # type: ignore[arg-type]

    async def fail() -> None:
        raise Forbidden("no")

    with pytest.raises(Forbidden):
        bridge.call(fail, timeout=5)


def test_a_reactor_that_never_answers_is_a_timeout_not_a_hang() -> None:
    bridge = ReactorBridge(DeadReactor())  # type: ignore[arg-type]
    with pytest.raises(BridgeTimeout):
        bridge.call(Deferred, timeout=0.05)
    assert status_of(BridgeTimeout("late")).code is grpc.StatusCode.UNAVAILABLE


def test_a_result_arriving_after_the_deadline_is_abandoned() -> None:
    reactor = ThreadReactor()
    bridge = ReactorBridge(reactor)  # type: ignore[arg-type]
    late: Deferred[int] = Deferred()
    abandoned: list[int] = []
    read, write = os.pipe()
    with pytest.raises(BridgeTimeout):
        bridge.call(
            lambda: late, timeout=0.05, abandon=lambda fd: (abandoned.append(fd), os.close(fd))
        )
    reactor.callFromThread(late.callback, read)
    done = threading.Event()
    reactor.callFromThread(done.set)
    assert done.wait(5)
    assert abandoned == [read]
    os.close(write)


@pytest.mark.parametrize(
    ("error", "code", "retry"),
    [
        (DigestMismatch("bad"), grpc.StatusCode.INVALID_ARGUMENT, None),
        (ServiceUnavailable("draining"), grpc.StatusCode.UNAVAILABLE, 1),
        (ServiceUnavailable("x", retry_after=None), grpc.StatusCode.UNAVAILABLE, 1),
        (TooManyRequests("cap"), grpc.StatusCode.RESOURCE_EXHAUSTED, 1),
        (Forbidden("no"), grpc.StatusCode.PERMISSION_DENIED, None),
        (ValueError("bug"), grpc.StatusCode.INTERNAL, None),
    ],
)
def test_errors_map_to_grpc_codes(
    error: Exception, code: grpc.StatusCode, retry: int | None
) -> None:
    abort = status_of(error)
    assert isinstance(abort, RpcAbort)
    assert (abort.code, abort.retry_after) == (code, retry)
