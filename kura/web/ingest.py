"""Where a request body goes, from its head to its last byte: :class:`BodyIngest`.

One body moves through explicit phases::

    HELD ----------> STAGING  (an artifact: a staging file, paced, disk-bound)
      |  admitted \\-> MEMORY   (a small JSON body: memory, up to the route's limit)
      |  refused    \\> DISCARDING (answered from its head, or refused midway)
      v
    DISCARDING

and ends ``FINISHED`` (complete, or given up). While the head is being
admitted the body is **held**: bytes twisted.web already parsed are kept in
order (HTTP/1.1), and the source is paused so no more arrive. Once admission
decided, the held bytes are replayed into the chosen sink and the source is
resumed, in that order: an HTTP/2 stream hands over what *it* held back at
once, inside the resume, so the sink must be ready first.

A staged body's TCP connection reads up to :data:`STAGED_READ_BYTES` per
turn until the body ends (fewer, larger chunks cost the reactor less per
byte); the next request on the connection reads as twisted.web does.

The source is paused for any of several reasons at once (admission, the disk
behind, the peer limiter's pacing, a discard being scheduled) and resumes
only when none is left. On HTTP/1.1 it is the connection's transport; on
HTTP/2 it is the stream, which stops giving its flow-control window back, so
at most one window waits in memory while its neighbours go on.

A sink refuses what it cannot take by raising a ``KuraError`` from
:meth:`BodyIngest.receive` (``PayloadTooLarge`` with the route's own
wording, ``TmpBudgetExhausted`` ...); the request answers with it, and the
staging file and its reservation are released at once.
"""

from __future__ import annotations

import enum
import io
from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IReactorTime

from kura.domain.errors import PayloadTooLarge
from kura.storage.staging import StagingFile

from .admission import Pacer

#: How much one read of a staged body's connection may take (twisted's
#: default is 64 KiB): fewer, larger chunks cost the reactor less per byte.
STAGED_READ_BYTES = 1024 * 1024


class Phase(enum.Enum):
    """Where a body's bytes go now."""

    HELD = "held"
    STAGING = "staging"
    MEMORY = "memory"
    DISCARDING = "discarding"
    FINISHED = "finished"


#: Why the source is paused (several may hold at once).
ADMISSION, DISK, PACING, DISCARD = "admission", "disk", "pacing", "discard"


class BodyIngest:
    """One request body's way in (see the module docstring).

    Args:
        source: returns what to pause so no more body arrives (the transport
            or the HTTP/2 stream), or ``None`` once the request is gone.
        clock: when paced bytes may flow again.
    """

    def __init__(self, source: Callable[[], Any], clock: IReactorTime) -> None:
        self._source = source
        self._clock = clock
        self.phase = Phase.HELD
        self.memory = io.BytesIO()
        self.staging: StagingFile | None = None
        self._held: list[bytes] = []
        self._pauses: set[str] = set()
        self._limit = 0
        self._too_large = ""
        self._pacer: Pacer | None = None
        self._default_read_size: int | None = None

    # -- pausing ----------------------------------------------------------------------

    def pause(self, reason: str) -> None:
        source = self._source()
        if not self._pauses and source is not None:
            source.pauseProducing()
        self._pauses.add(reason)

    def resume(self, reason: str) -> None:
        if reason in self._pauses:
            self._pauses.discard(reason)
            source = self._source()
            if not self._pauses and source is not None:
                source.resumeProducing()

    def paused_for(self, reason: str) -> bool:
        return reason in self._pauses

    # -- phases -----------------------------------------------------------------------

    def hold(self) -> None:
        """Admission is still deciding: keep what arrives, stop the rest."""
        self.pause(ADMISSION)

    def stage(self, staging: StagingFile, *, too_large: str, pacer: Pacer | None) -> None:
        """Bytes go into ``staging`` (which may ask to pause for the disk)."""
        self.phase = Phase.STAGING
        self.staging = staging
        self._too_large = too_large
        self._pacer = pacer
        self._read_size(STAGED_READ_BYTES)

    def _read_size(self, size: int | None) -> None:
        """Set (or with ``None`` restore) the TCP transport's read size, if it has one."""
        source = self._source()
        if source is None or not hasattr(source, "bufferSize"):
            return
        if size is None:
            if self._default_read_size is not None:
                source.bufferSize = self._default_read_size
            return
        if self._default_read_size is None:
            self._default_read_size = source.bufferSize
        source.bufferSize = size

    def keep_in_memory(self, *, limit: int, too_large: str) -> None:
        """Bytes go into :attr:`memory`, at most ``limit`` of them."""
        self.phase = Phase.MEMORY
        self._limit = limit
        self._too_large = too_large

    def discard(self) -> None:
        """Bytes are dropped from now on (the request is answered without them)."""
        self.phase = Phase.DISCARDING
        self._held.clear()

    def admitted(self) -> None:
        """Admission decided: replay what was held into the sink, then let the rest come."""
        held, self._held = self._held, []
        try:
            for chunk in held:
                self.receive(chunk)
        finally:
            self.resume(ADMISSION)

    # -- bytes ------------------------------------------------------------------------

    def receive(self, data: bytes) -> None:
        """Take the next body chunk into the current sink.

        Raises:
            KuraError: the sink refuses it (too large, staging budget, a
                failed disk write); nothing more should be received.
        """
        phase = self.phase
        if phase is Phase.STAGING:
            assert self.staging is not None
            try:
                self.staging.write(data)
            except PayloadTooLarge:
                # The route's own wording (e.g. "Part exceeds 10MB limit"), as
                # when the declared length is over the limit.
                raise PayloadTooLarge(self._too_large) from None
            self._pace(len(data))
        elif phase is Phase.MEMORY:
            if self.memory.tell() + len(data) > self._limit:
                raise PayloadTooLarge(self._too_large)
            self.memory.write(data)
        elif phase is Phase.HELD:
            self._held.append(data)
        # DISCARDING and FINISHED drop what still arrives.

    def _pace(self, size: int) -> None:
        """Hold the source back for as long as the pacer's reservation says."""
        if self._pacer is None:
            return
        delay = self._pacer.reserve(size)
        if delay > 0 and not self.paused_for(PACING):
            self.pause(PACING)
            self._clock.callLater(delay, self.resume, PACING)

    def on_disk_pressure(self, paused: bool) -> None:
        """The staging file's writes fell behind (``True``) or caught up."""
        if paused:
            self.pause(DISK)
        else:
            self.resume(DISK)

    # -- the end ----------------------------------------------------------------------

    def abort(self) -> None:
        """Give up: drop the staged file and its reservation now, drop what arrives."""
        if self.staging is not None:
            self.staging.abort()
        self._read_size(None)
        self.discard()

    def finished(self) -> None:
        """The whole body arrived (it is the handler's now)."""
        self._read_size(None)  # the next request on the connection starts small
        if self.phase is not Phase.DISCARDING:
            self.phase = Phase.FINISHED
