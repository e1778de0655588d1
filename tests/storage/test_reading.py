"""BlobRange: chunked reads of an owned descriptor, closed only when no read can use it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kura.storage.reading import BlobRange, IncompleteBody, read_small
from kura.testing import ControlledRunner, failed, succeeded
from tests.support.descriptors import is_open, open_blob


def test_reads_the_range_chunk_by_chunk(tmp_path: Path) -> None:
    fd = open_blob(tmp_path, b"0123456789")
    blob = BlobRange(fd, offset=2, length=7, runner=ControlledRunner())

    assert succeeded(blob.read(4)) == b"2345"
    assert blob.remaining == 3
    # A chunk never runs past the range, whatever size is asked for.
    assert succeeded(blob.read(100)) == b"678"
    assert blob.remaining == 0
    blob.close()
    assert not is_open(fd)


def test_a_short_file_fails_with_incomplete_body(tmp_path: Path) -> None:
    fd = open_blob(tmp_path, b"abc")
    blob = BlobRange(fd, offset=0, length=10, runner=ControlledRunner())

    assert succeeded(blob.read(8)) == b"abc"
    error = failed(blob.read(8))
    assert isinstance(error, IncompleteBody)
    assert "7 bytes short" in str(error)
    blob.close()


def test_a_read_error_fails_the_read(tmp_path: Path) -> None:
    fd = open_blob(tmp_path, b"abc")
    runner = ControlledRunner()
    runner.hold = lambda f: True
    blob = BlobRange(fd, offset=0, length=3, runner=runner)
    reading = blob.read(3)
    os.close(fd)  # the read now fails with EBADF

    runner.release()

    assert isinstance(failed(reading), OSError)
    assert not blob.reading


def test_close_during_a_read_waits_for_it_and_never_fires(tmp_path: Path) -> None:
    """Closing under a running pread would let the number be reused mid-read."""
    fd = open_blob(tmp_path, b"abcdef")
    runner = ControlledRunner()
    runner.hold = lambda f: True
    blob = BlobRange(fd, offset=0, length=6, runner=runner)
    results: list[object] = []
    blob.read(6).addBoth(results.append)

    blob.close()
    assert blob.closed
    assert is_open(fd), "closed while a storage thread still reads through it"

    runner.release()
    assert not is_open(fd)
    assert results == []


def test_close_is_idempotent_and_read_after_close_is_a_bug(tmp_path: Path) -> None:
    fd = open_blob(tmp_path, b"abc")
    blob = BlobRange(fd, offset=0, length=3, runner=ControlledRunner())
    blob.close()
    blob.close()
    assert not is_open(fd)
    with pytest.raises(AssertionError):
        blob.read(1)


def test_read_small_reads_the_range_at_once(tmp_path: Path) -> None:
    fd = open_blob(tmp_path, b"0123456789")
    try:
        assert read_small(fd, 2, 7) == b"2345678"
        assert read_small(fd, 0, 0) == b""
    finally:
        os.close(fd)


def test_read_small_of_a_short_file_is_an_incomplete_body(tmp_path: Path) -> None:
    fd = open_blob(tmp_path, b"abc")
    try:
        with pytest.raises(IncompleteBody, match="7 bytes short"):
            read_small(fd, 0, 10)
    finally:
        os.close(fd)


def test_read_small_raises_the_read_error(tmp_path: Path) -> None:
    fd = open_blob(tmp_path, b"abc")
    os.close(fd)
    with pytest.raises(OSError):
        read_small(fd, 0, 3)
