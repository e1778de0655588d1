"""Event dispatch without the legacy log context, on a real epoll reactor.

Each test drives its own ``EPollReactor`` (not the global one) one iteration
at a time over a real socket pair.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import pytest
from twisted.internet.epollreactor import EPollReactor
from twisted.internet.task import Clock
from twisted.logger import LogEvent, globalLogPublisher
from twisted.python import context, log

from kura.web.event_dispatch import dispatch_without_log_context


class Reader:
    """A read selectable over one end of a socket pair that records what happens to it."""

    def __init__(self, sock: socket.socket, fail_read: bool = False, fail_lost: bool = False):
        self.sock = sock
        self.fail_read = fail_read
        self.fail_lost = fail_lost
        self.read: list[bytes] = []
        self.systems: list[Any] = []
        self.lost: list[Any] = []

    def fileno(self) -> int:
        return self.sock.fileno()

    def logPrefix(self) -> str:
        return "Reader-prefix"

    def doRead(self) -> None:
        self.systems.append(context.get(log.ILogContext, {}).get("system"))
        if self.fail_read:
            raise RuntimeError("doRead failed")
        self.read.append(self.sock.recv(100))

    def connectionLost(self, reason: Any) -> None:
        self.lost.append(reason)
        if self.fail_lost:
            raise RuntimeError("connectionLost failed")


@pytest.fixture
def reactor() -> Iterator[EPollReactor]:
    reactor = EPollReactor()
    assert dispatch_without_log_context(reactor)
    yield reactor
    reactor._poller.close()  # the tests close their own sockets
    reactor.waker.connectionLost(None)


@pytest.fixture
def logged() -> Iterator[list[LogEvent]]:
    events: list[LogEvent] = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)


def _failure(event: LogEvent) -> Any:
    """The failure a log event carries (twisted.logger's or legacy ``log.err``'s key)."""
    return event.get("log_failure", event.get("failure"))


def _pair() -> tuple[socket.socket, socket.socket]:
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    return ours, theirs


def test_ready_descriptors_are_read_outside_a_log_context(reactor: EPollReactor) -> None:
    """Each ready reader gets its doRead, with no ``system`` context set around it."""
    (a, a_peer), (b, b_peer) = _pair(), _pair()
    first, second = Reader(a), Reader(b)
    reactor.addReader(first)
    reactor.addReader(second)
    a_peer.send(b"one")
    b_peer.send(b"two")
    reactor.doIteration(0)
    assert (first.read, second.read) == ([b"one"], [b"two"])
    assert first.systems == ["-"]  # stock Twisted: ["Reader-prefix"]
    reactor.doIteration(0)  # nothing ready: nothing read again
    assert (first.read, second.read) == ([b"one"], [b"two"])
    for sock in (a, a_peer, b, b_peer):
        sock.close()


def test_a_failing_read_disconnects_that_selectable_only(
    reactor: EPollReactor, logged: list[LogEvent]
) -> None:
    """An exception from doRead is logged and disconnects its selectable; the
    other ready descriptor of the same poll is still read."""
    (a, a_peer), (b, b_peer) = _pair(), _pair()
    broken, fine = Reader(a, fail_read=True), Reader(b)
    reactor.addReader(broken)
    reactor.addReader(fine)
    a_peer.send(b"x")
    b_peer.send(b"y")
    reactor.doIteration(0)
    assert len(broken.lost) == 1 and broken.lost[0].check(RuntimeError)
    assert broken not in reactor.getReaders()
    assert fine.read == [b"y"] and not fine.lost
    assert any(_failure(event) is not None for event in logged)
    for sock in (a, a_peer, b, b_peer):
        sock.close()


def test_an_error_escaping_the_handler_is_logged_and_the_loop_goes_on(
    reactor: EPollReactor, logged: list[LogEvent]
) -> None:
    """connectionLost raising (what _doReadOrWrite lets through) does not stop the
    other events of the poll."""
    (a, a_peer), (b, b_peer) = _pair(), _pair()
    broken = Reader(a, fail_read=True, fail_lost=True)
    fine = Reader(b)
    reactor.addReader(broken)
    reactor.addReader(fine)
    a_peer.send(b"x")
    b_peer.send(b"y")
    reactor.doIteration(0)
    assert fine.read == [b"y"]
    failures = [_failure(event) for event in logged if _failure(event) is not None]
    assert any(f.check(RuntimeError) and "connectionLost" in str(f.value) for f in failures)
    for sock in (a, a_peer, b, b_peer):
        sock.close()


def test_other_reactors_are_left_alone() -> None:
    clock = Clock()
    assert not dispatch_without_log_context(clock)
    assert "doIteration" not in vars(clock)
