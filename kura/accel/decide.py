"""Whether the accelerator serves a classified request itself, or falls back and why.

Two pure steps, so every outcome is tested without a socket or a reactor
(``tests/accel/test_decide.py``); the connection (:mod:`.protocol`) only
gathers their inputs and acts on the answer:

* :func:`admit`, before anything is looked up: a draining node and a
  saturated accelerator leave the request to twisted.web (which answers a
  draining node's 503, and serves what the accelerator has no permit for);
* :func:`decide`, once the manifest is known and, for a file-backed
  artifact, its file is open: :class:`Serve` with the response head, or
  :class:`Fallback` with the reason (a :mod:`.reasons` label).

Authorization is not decided here: it runs exactly once, after
:func:`decide` said :class:`Serve` (so every fall-back happens before any
check ran, and twisted.web's own check is the only one on its path).
"""

from __future__ import annotations

from typing import Protocol, TypeGuard

import attrs

from kura.domain.artifacts import Manifest
from kura.domain.errors import KuraError
from kura.web.download import ArtifactHead, artifact_head

from . import reasons
from .classify import Candidate
from .response import header_fields


class OpenedFile(Protocol):
    """What :func:`decide` needs of an opened artifact file (a :class:`~.handles.Lease`)."""

    @property
    def size(self) -> int: ...


@attrs.frozen
class HeldBody:
    """A body kept in the database and held in memory (:mod:`kura.storage.bodies`):
    what :func:`decide` reads of it is its size, as of an opened file."""

    data: bytes

    @property
    def size(self) -> int:
        return len(self.data)


@attrs.frozen
class Serve:
    """Serve the request here.

    Attributes:
        response: status, headers and byte range of the response, exactly
            as twisted.web would answer (:func:`~kura.web.download.artifact_head`).
        fields: ``response.headers`` serialized as head lines
            (:func:`~.response.header_fields`).
    """

    response: ArtifactHead
    fields: bytes


@attrs.frozen
class Fallback:
    """Hand the request, untouched, to twisted.web.

    Attributes:
        reason: why (the ``reason`` label of ``kura_accelerator_fallbacks_total``).
    """

    reason: str


_DRAINING = Fallback(reasons.DRAINING)
_SATURATED = Fallback(reasons.SATURATED)
_MISS = Fallback(reasons.MISS)
_INLINE = Fallback(reasons.INLINE)
_OPEN = Fallback(reasons.OPEN)
_RANGE_OR_DAMAGE = Fallback(reasons.RANGE_OR_DAMAGE)


def admit(*, draining: bool, permits_free: bool) -> Fallback | None:
    """Whether a candidate may go on to its look-up (``None``) or falls back now."""
    if draining:
        return _DRAINING
    if not permits_free:
        return _SATURATED
    return None


def is_file_backed(manifest: Manifest | None) -> TypeGuard[Manifest]:
    """Whether ``manifest`` names a body file to open (otherwise its body is in
    the database: served from memory when held, else by twisted.web)."""
    return manifest is not None and not manifest.inline and manifest.blob_path is not None


def decide(
    candidate: Candidate, manifest: Manifest | None, lease: OpenedFile | None
) -> Serve | Fallback:
    """Serve ``candidate`` here, or fall back (see the module docstring).

    Args:
        candidate: the classified request.
        manifest: the artifact's manifest, ``None`` when it is not stored.
        lease: its opened file (only its current size is read; its bytes
            were verified against the manifest's digest before), ``None``
            when the file, or the pipe its transfer needs, could not be
            opened; or, for a body kept in the database, the body held in
            memory (:class:`HeldBody`), ``None`` when it is not held.
    """
    if manifest is None:
        return _MISS
    if manifest.inline:
        return _INLINE
    if lease is None:
        # A file (or the pipe its transfer needs) that could not be opened;
        # a body kept in the database that is not held in memory.
        return _OPEN if is_file_backed(manifest) else _INLINE
    if lease.size != manifest.size:
        # Damaged: twisted.web opens it again, forgets it and answers 404.
        return _RANGE_OR_DAMAGE
    head = candidate.head
    if head.plain:  # no Range, no If-Range
        range_header = if_range = None
    else:
        range_header = head.get(b"range")
        if_range = head.get(b"if-range")
    if range_header is None and if_range is None:
        return serve_whole(manifest)
    try:
        response = artifact_head(manifest, _text(range_header), _text(if_range))
    except KuraError:
        # Unsatisfiable: twisted.web answers 416 after authorization.
        return _RANGE_OR_DAMAGE
    return Serve(response, header_fields(response.headers))


_WHOLE: dict[str, tuple[Manifest, Serve]] = {}
_WHOLE_MAX = 4096


def serve_whole(manifest: Manifest) -> Serve:
    """How a request for the whole of a file-backed artifact, with no
    Range or If-Range, is served: it depends on the manifest alone.

    One decision (and one serialized head) per artifact version, kept by
    file name (every version is a new file), or by id for a body kept in
    the database, and checked by identity (hashing a manifest costs more
    than the look-up saves).
    """
    key = manifest.blob_path or manifest.artifact_id
    cached = _WHOLE.get(key)
    if cached is not None and cached[0] is manifest:
        return cached[1]
    if len(_WHOLE) >= _WHOLE_MAX:
        _WHOLE.clear()
    response = artifact_head(manifest, None, None)
    serve = Serve(response, header_fields(response.headers))
    _WHOLE[key] = (manifest, serve)
    return serve


def _text(value: bytes | None) -> str | None:
    return None if value is None else value.decode("latin-1")
