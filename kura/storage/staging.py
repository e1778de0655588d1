"""Receiving request bodies into staging files, off the reactor thread.

A :class:`StagingFile` takes body chunks on the reactor thread, counts them
against the route limit and the staging budget *as they arrive*, and writes
them to ``<tmp>/uploads/<uuid>`` on a storage thread, one write in flight at a
time. When more than :data:`HIGH_WATER` bytes wait in memory it asks its
owner to pause the transport, so a fast client never balloons the process.

The budget is reserved in :data:`RESERVATION_STEP` steps as bytes arrive,
never for the declared length up front: an upload that declares the whole
budget and then trickles a byte now and then holds one step, not the budget
(every other upload would be refused until it disconnected). A declared
length is still checked against the budget's free space when the file is
created, so an upload that cannot fit is refused before its first byte.

A body whose declared length is at most ``KURA_MEMORY_BODY_MAX_BYTES``
(``in_memory``) is kept in memory instead: no staging file, no thread hop
per chunk, and :meth:`StagingFile.finish` returns its bytes
(:attr:`StagedBody.data`) for the store to keep in the metadata database
with its manifest (metadata schema 4). It is counted against the staging budget
exactly like a staged body (the budget caps the bytes of bodies in flight,
wherever they wait), and it is smaller than :data:`FLUSH_AT`, which a staged
body may hold in memory before its first write anyway.

A staged body is hashed (SHA-256) as it is written, on the storage thread
that writes each chunk: its digest is stored with the artifact and checked
against what a peer or a content-addressed key declared, without reading the
file again. A body held in memory is hashed in the transaction that
stores it, also on a storage thread.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
from collections.abc import Callable

import attrs
from twisted.internet.defer import Deferred, succeed
from twisted.python.failure import Failure

from kura.domain.errors import (
    InsufficientStorage,
    PayloadTooLarge,
    ServiceUnavailable,
    StorageFault,
    TmpBudgetExhausted,
)
from kura.domain.failpoints import BEFORE_FSYNC, Failpoints
from kura.storage.interfaces import IBlockingRunner

#: Buffered bytes that trigger a write to disk.
FLUSH_AT = 256 * 1024
#: Buffered bytes at which the producer (transport) is paused, and resumed below.
HIGH_WATER = 4 * 1024 * 1024
LOW_WATER = 1024 * 1024
#: Default largest declared length received in memory (``KURA_MEMORY_BODY_MAX_BYTES``).
MEMORY_BODY_MAX_BYTES = 64 * 1024
#: Bodies reserve staging budget in steps of this size as their bytes arrive
#: (a declared length caps the last step).
RESERVATION_STEP = 1024 * 1024


class TmpBudget:
    """The ``KURA_TMP_DIR_MAX_BYTES`` ledger of staged bytes.

    Reservations are made on the reactor thread before bytes are written, so
    the staging directory can never outgrow the budget.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    @property
    def free(self) -> int:
        """Bytes that can still be reserved (0 when over a lowered limit)."""
        return max(0, self.limit - self.used)

    def check_fits(self, amount: int) -> None:
        """Raise :class:`TmpBudgetExhausted` unless ``amount`` fits the free space now.

        Nothing is reserved: this is the head-time verdict on a declared
        length, whose bytes are reserved only as they arrive.
        """
        if amount > self.free:
            raise self._exhausted(amount)

    def reserve(self, amount: int) -> None:
        """Reserve ``amount`` bytes or raise :class:`TmpBudgetExhausted`."""
        if self.used + amount > self.limit:
            raise self._exhausted(amount)
        self.used += amount

    def _exhausted(self, amount: int) -> TmpBudgetExhausted:
        return TmpBudgetExhausted(
            "Temporary storage budget exhausted: "
            f"{self.used} of {self.limit} bytes staged, {amount} more requested"
        )

    def release(self, amount: int) -> None:
        self.used = max(0, self.used - amount)


def translate_os_error(error: OSError) -> Exception:
    """Map a storage ``OSError`` to the domain error a client should see."""
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return InsufficientStorage("server has insufficient free disk space")
    if error.errno in (errno.EMFILE, errno.ENFILE):
        return ServiceUnavailable("server is at file descriptor capacity")
    return StorageFault(f"storage I/O error: {error.strerror or error}")


#: The ``path`` of a :class:`StagedBody` received in memory: it has no file.
NO_FILE = ""


@attrs.frozen
class StagedBody:
    """A complete body: durable (fsynced and closed) at ``path``, or ``data`` in memory.

    Attributes:
        sha256: the hex SHA-256 of a staged file, computed as it was written;
            ``None`` for a body held in memory (hashed where it is written)
            or one staged without hashing (a multipart part).
        data: the bytes of a body received in memory (then ``path`` is
            :data:`NO_FILE` and nothing is durable yet), else ``None``.
    """

    path: str
    size: int
    sha256: str | None
    reserved: int
    data: bytes | None = None


class _Writer:
    """The blocking half: owns the file descriptor, lives on storage threads."""

    def __init__(self, path: str | Callable[[], str], hashed: bool) -> None:
        self._path = path
        self.fd: int | None = None
        self.hasher = hashlib.sha256() if hashed else None

    @property
    def path(self) -> str:
        """The staging file's name, chosen when first asked for (most small
        bodies never need one)."""
        if not isinstance(self._path, str):
            self._path = self._path()
        return self._path

    def append(self, chunk: bytes) -> None:
        if self.fd is None:
            self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        view = memoryview(chunk)
        while view:
            written = os.write(self.fd, view)
            view = view[written:]
        if self.hasher is not None:
            self.hasher.update(chunk)

    def seal(self, tail: bytes, failpoints: Failpoints) -> str | None:
        """Write ``tail``, fsync and close; return the hex digest if hashing."""
        self.append(tail)
        assert self.fd is not None
        try:
            failpoints.hit(BEFORE_FSYNC)
            os.fsync(self.fd)
        finally:
            os.close(self.fd)
            self.fd = None
        return None if self.hasher is None else self.hasher.hexdigest()

    def discard(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        if isinstance(self._path, str):  # else no file was ever named
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._path)


class StagingFile:
    """A request body on its way into staging.

    Args:
        path: where to stage (a fresh name under ``<tmp>/uploads``), or a
            function that names it when the body first needs a file.
        runner: where blocking writes run.
        budget: the staging ledger to reserve against.
        limit: the route's maximum body size; more is :class:`PayloadTooLarge`.
        expected_length: the declared length, if any. It must fit the
            budget's free space now (so a hopeless upload is refused before
            its first byte), but is not reserved: bytes are reserved in
            :data:`RESERVATION_STEP` steps as they arrive, the last step
            capped at this length.
        hashed: compute the SHA-256 of the body while writing it (every
            body that becomes an artifact; a multipart part need not be, its
            assembled body is hashed when the upload completes).
        in_memory: keep the body in memory (a small declared length; see
            the module docstring). A body that outgrows ``expected_length``
            goes to the file after all.
        on_pressure: called with ``True`` to ask the body's producer to pause
            and ``False`` to resume.

    Raises:
        PayloadTooLarge: ``expected_length`` exceeds ``limit``.
        TmpBudgetExhausted: ``expected_length`` exceeds the budget's free space.
    """

    def __init__(
        self,
        *,
        path: str | Callable[[], str],
        runner: IBlockingRunner,
        budget: TmpBudget,
        failpoints: Failpoints,
        limit: int,
        expected_length: int | None = None,
        hashed: bool = True,
        in_memory: bool = False,
        on_pressure: Callable[[bool], None] | None = None,
    ) -> None:
        if expected_length is not None and expected_length > limit:
            raise PayloadTooLarge("Request body exceeded allowed size")
        if expected_length is not None:
            budget.check_fits(expected_length)
        self._runner = runner
        self._budget = budget
        self._failpoints = failpoints
        self._limit = limit
        self._expected = expected_length
        self._writer = _Writer(path, hashed)
        self._in_memory = in_memory and expected_length is not None
        self._on_pressure = on_pressure
        self._buffer: list[bytes] = []
        self._buffered = 0
        self._paused = False
        self._inflight: Deferred[None] | None = None
        self._error: Failure | None = None
        self._closed = False
        self.received = 0
        self.reserved = 0

    @property
    def path(self) -> str:
        return self._writer.path

    def _reserve_received(self) -> None:
        """Grow the reservation to cover every byte received, a step at a time."""
        while self.received > self.reserved:
            step = RESERVATION_STEP
            if self._expected is not None and self.reserved < self._expected:
                # A body's last step is what remains of its declared length.
                step = min(step, self._expected - self.reserved)
            self._budget.reserve(step)
            self.reserved += step

    def write(self, data: bytes) -> None:
        """Accept the next body chunk (reactor thread).

        Raises:
            PayloadTooLarge: the body grew past the route limit.
            TmpBudgetExhausted: the body's next reservation step does not fit
                the budget (other uploads took the room since its head was
                admitted). The caller aborts the file, which releases
                everything reserved so far.
            Exception: an earlier background write failed.
        """
        if self._error is not None:
            self._error.raiseException()
        self.received += len(data)
        if self.received > self._limit:
            raise PayloadTooLarge("Request body exceeded allowed size")
        self._reserve_received()
        self._buffer.append(data)
        self._buffered += len(data)
        if self._in_memory:
            assert self._expected is not None
            if self.received <= self._expected:
                return
            self._in_memory = False  # more than declared: the file takes it all
        if self._buffered >= FLUSH_AT:
            self._flush()
        if self._buffered > HIGH_WATER and not self._paused:
            self._set_pressure(True)

    def _set_pressure(self, paused: bool) -> None:
        self._paused = paused
        if self._on_pressure is not None:
            self._on_pressure(paused)

    def _take(self) -> bytes:
        chunk = b"".join(self._buffer)
        self._buffer.clear()
        self._buffered = 0
        return chunk

    def _flush(self) -> None:
        if self._inflight is not None or not self._buffered:
            return
        chunk = self._take()
        self._inflight = self._runner.run(self._writer.append, chunk)
        self._inflight.addCallbacks(self._flushed, self._flush_failed)

    def _flushed(self, _: None) -> None:
        self._inflight = None
        if self._paused and self._buffered < LOW_WATER:
            self._set_pressure(False)
        if self._buffered >= FLUSH_AT:
            self._flush()

    def _flush_failed(self, failure: Failure) -> None:
        self._inflight = None
        self._error = _translate(failure)
        if self._paused:
            self._set_pressure(False)

    async def finish(self) -> StagedBody:
        """Make the complete body durable and return it.

        The caller owns the returned file and its reservation from here on.
        When this fails, the staged file is removed and its reservation
        released (nobody else would: the caller never got the file).
        """
        if self._in_memory:
            return self._finish_in_memory()
        try:
            while self._inflight is not None:
                await self._inflight
            if self._error is not None:
                self._error.raiseException()
            try:
                digest = await self._runner.run(self._writer.seal, self._take(), self._failpoints)
            except OSError as error:
                raise translate_os_error(error) from error
        except BaseException:
            await self.abort()
            raise
        self._closed = True
        return StagedBody(self.path, self.received, digest, self.reserved)

    def _finish_in_memory(self) -> StagedBody:
        data = self._take()
        self._closed = True
        # Hashed where it is written, on a storage thread (not here, on the reactor).
        return StagedBody(NO_FILE, len(data), None, self.reserved, data)

    def abort(self) -> Deferred[None]:
        """Throw the body away: remove the file and release the reservation."""
        if self._closed:
            return succeed(None)
        self._closed = True
        self._buffer.clear()
        self._buffered = 0
        pending = self._inflight if self._inflight is not None else succeed(None)

        def discard(_: object) -> Deferred[None]:
            self._budget.release(self.reserved)
            self.reserved = 0
            if self._in_memory:
                return succeed(None)  # no file was ever created
            return self._runner.run(self._writer.discard)

        return pending.addBoth(discard)


def _translate(failure: Failure) -> Failure:
    if isinstance(failure.value, OSError):
        return Failure(translate_os_error(failure.value))
    return failure
