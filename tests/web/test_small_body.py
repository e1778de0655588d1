"""SmallFileBody: a small artifact body sent with one read on the reactor thread."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kura.web.download import SMALL_BODY_BYTES, SmallFileBody, TransferFailed
from tests.support.descriptors import is_open, open_blob


class Request:
    """What the body writes to: collects bytes; ``_disconnected`` as twisted.web's."""

    def __init__(self, *, disconnected: bool = False) -> None:
        self.written: list[bytes] = []
        self._disconnected = disconnected

    def write(self, data: bytes) -> None:
        self.written.append(data)


def test_the_range_is_written_in_one_write_and_the_file_closed(tmp_path: Path) -> None:
    fd = open_blob(tmp_path, b"0123456789")
    request = Request()
    body = SmallFileBody(request=request, fd=fd, offset=3, length=5)

    assert body.send() == 5
    assert request.written == [b"34567"]
    assert body.sent == 5
    assert not is_open(fd)


def test_an_empty_range_writes_nothing(tmp_path: Path) -> None:
    fd = open_blob(tmp_path, b"")
    request = Request()

    assert SmallFileBody(request=request, fd=fd, offset=0, length=0).send() == 0
    assert request.written == []
    assert not is_open(fd)


def test_a_file_shorter_than_promised_fails_incomplete_and_writes_nothing(tmp_path: Path) -> None:
    fd = open_blob(tmp_path, b"abc")
    request = Request()
    body = SmallFileBody(request=request, fd=fd, offset=0, length=10)

    with pytest.raises(TransferFailed) as failed:
        body.send()
    assert (failed.value.result, failed.value.sent) == ("incomplete", 0)
    assert request.written == []
    assert not is_open(fd)


def test_a_client_already_gone_is_client_aborted(tmp_path: Path) -> None:
    fd = open_blob(tmp_path, b"abc")
    request = Request(disconnected=True)

    with pytest.raises(TransferFailed) as failed:
        SmallFileBody(request=request, fd=fd, offset=0, length=3).send()
    assert failed.value.result == "client_aborted"
    assert request.written == []
    assert not is_open(fd)


def test_a_large_body_is_refused(tmp_path: Path) -> None:
    fd = open_blob(tmp_path, b"")
    try:
        with pytest.raises(AssertionError):
            SmallFileBody(request=Request(), fd=fd, offset=0, length=SMALL_BODY_BYTES + 1)
    finally:
        os.close(fd)
