"""The receiving end of replication: decide before the body, then apply durably.

``PUT /_internal/replicate/artifact`` is admitted from its head: the query
names the artifact version (:class:`~kura.replication.wire.UpsertMessage`),
and :meth:`Receiver.admit_upsert` asks the store whether that version would
apply. A stale, equal or tombstoned version is answered ``204`` at once with
its body left unread (the connection closes after the answer). Otherwise the
body is staged, paced by the bandwidth limiter (the request's transport is
paused, nothing is buffered), its length is checked against the declared
``Content-Length``, and it is published with the same durable order as a
public write, under last-writer-wins and with *no* outbox rows (peers are
not re-sent each other's writes). Applying the same message twice stores it
once: the second is ``ignored_equal``.

Every body is hashed as it lands (on storage threads) and, when its sender
declared a digest (``X-Kura-Content-Sha256``: signed by a signing peer,
sent as a plain header by any peer of this release), checked against it
before it is published: a body that does not match is refused (400,
``kura_replication_rejected_total{reason="digest_mismatch"}``) and nothing
is stored. A body from a previous-release peer that declares nothing is
stored with the digest computed here.

``DELETE /_internal/replicate/namespace`` applies a tombstone (``applied`` or
``ignored_older``); a tombstone never moves backwards and is never undone.

``DELETE /_internal/replicate/artifact`` applies one artifact's tombstone
(a client's ccache ``DELETE`` on a peer): ``applied`` (the stored version, if
any, is dropped and the tombstone recorded), ``ignored_older`` (an equal or
newer tombstone is there) or ``ignored_stale`` (a newer version is stored,
and survives). Unlike a namespace's, it is cleared by a newer write and
purged after ``KURA_TOMBSTONE_RETENTION_MS``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from kura.defer import shielded
from kura.domain.artifacts import ArtifactAddress, Target, is_digest, safe_content_type
from kura.domain.errors import BadFraming, BadRequest, DigestMismatch, KuraError, PayloadTooLarge
from kura.storage.interfaces import IArtifactStore, IBlockingRunner
from kura.storage.metadata import Outcome, WritePolicy
from kura.storage.staging import StagedBody, StagingFile
from kura.telemetry.metrics import KuraMetrics
from kura.web.admission import Admission, RequestHead
from kura.web.routing import GiB, Query, RouteSpec

from .limiter import BandwidthLimiter
from .peer_auth import DIGEST_HEADER, UNSIGNED, PeerCaller
from .wire import ArtifactDeleteMessage, DeleteMessage, UpsertMessage

log = Logger(namespace="kura.replication.receiver")

PEER_CLEAN = "namespace {namespace!r} cleaned from a peer ({source}, version {version})"
PEER_DELETE = "artifact {artifact_id} deleted from a peer ({source}, version {version})"

#: Largest replicated file-backed body (upstream's 4 x 512 MiB).
MAX_REPLICATION_BODY_BYTES = 2 * GiB

SOURCE_REPLICATION = "replication"
SOURCE_BOOTSTRAP = "bootstrap"
ITEM_ARTIFACT = "artifact"
ITEM_NAMESPACE = "namespace_delete"
ITEM_ARTIFACT_DELETE = "artifact_delete"


class LengthRequired(KuraError):
    """A replicated body must declare its length."""

    status = 411
    close = True


class VersionAhead(KuraError):
    """A replicated version lies further in the future than clocks may drift.

    Accepting it would pin the key (no later write could win over it) or,
    for a tombstone, refuse every later write to the namespace. The sender
    retries (its outbox backs the row off), so a real but fast clock is
    only delayed until ours catches up.
    """

    status = 422
    close = True


@attrs.frozen
class ReplicaAdmission(Admission):
    """An admission that may have decided the write without its body.

    Attributes:
        decided: the outcome when the version does not apply (the body is
            skipped and the request answered 204); ``None`` to apply.
        peer: who signed the request.
        digest: the SHA-256 the sender declared for the body (signed, or a
            plain header from an unsigned peer of this release), or ``None``.
    """

    decided: Outcome | None = None
    peer: PeerCaller = UNSIGNED
    digest: str | None = None

    @property
    def skips_body(self) -> bool:
        return self.decided is not None or self.existing is not None


def _read_file(path: str) -> bytes:
    with open(path, "rb") as handle:
        return handle.read()


class Receiver:
    """Applies replicated writes to the local store (see the module docstring).

    Args:
        store: the node's store.
        metrics: apply-outcome counters.
        limiter: paces ingest.
        runner: blocking reads of staged inline bodies.
        clock: what "now" is for the version check.
        max_inline_bytes: ``KURA_MAX_KEYVALUE_BYTES``, the inline body limit.
        max_clock_skew_ms: ``KURA_MAX_CLOCK_SKEW_MS``: versions further ahead
            of our clock are refused.
    """

    def __init__(
        self,
        *,
        store: IArtifactStore,
        metrics: KuraMetrics,
        limiter: BandwidthLimiter,
        runner: IBlockingRunner,
        clock: IReactorTime,
        max_inline_bytes: int,
        max_clock_skew_ms: int,
    ) -> None:
        self._store = store
        self._metrics = metrics
        self._limiter = limiter
        self._runner = runner
        self._clock = clock
        self._max_inline = max_inline_bytes
        self._max_skew_ms = max_clock_skew_ms

    def count(self, source: str, item_type: str, outcome: Outcome) -> None:
        self._metrics.replication_apply_results.labels(source, item_type, outcome.value).inc()

    def version_ahead(self, version_ms: int) -> bool:
        """Whether ``version_ms`` is too far ahead of our clock (counted when so)."""
        if version_ms <= self._clock.seconds() * 1000 + self._max_skew_ms:
            return False
        self._metrics.replication_rejected.labels("clock_skew").inc()
        return True

    def check_version(self, version_ms: int) -> None:
        """Refuse a version too far ahead of our clock.

        Raises:
            VersionAhead: beyond ``KURA_MAX_CLOCK_SKEW_MS``.
        """
        if self.version_ahead(version_ms):
            raise VersionAhead(
                f"version_ms {version_ms} is more than {self._max_skew_ms} ms ahead of "
                "this node's clock"
            )

    def body_limit(self, inline: bool) -> int:
        return self._max_inline if inline else MAX_REPLICATION_BODY_BYTES

    # -- artifact upserts ---------------------------------------------------------------

    async def admit_upsert(
        self,
        spec: RouteSpec,
        path_args: Mapping[str, str],
        head: RequestHead,
        peer: PeerCaller = UNSIGNED,
    ) -> Admission:
        """Decide an upsert from its head (``peer``: who signed it).

        Raises:
            BadRequest: the query or the declared digest is invalid.
            VersionAhead: the version is too far in the future.
            LengthRequired: no ``Content-Length``.
            PayloadTooLarge: the declared body exceeds the limit.
        """
        message = UpsertMessage.parse(head.query)
        digest = peer.digest if peer.signed else declared_digest(head.headers)
        self.check_version(message.version_ms)
        if head.declared_length is None:
            raise LengthRequired("Replicated bodies need a Content-Length")
        limit = self.body_limit(message.inline)
        if head.declared_length > limit:
            raise PayloadTooLarge(f"Replicated body exceeds {limit} bytes")
        address = ArtifactAddress(message.producer, message.namespace_id, message.key)
        decided = await self._store.apply_preview(
            self._store.artifact_id(address), message.namespace_id, message.version_ms
        )
        return ReplicaAdmission(
            spec=attrs.evolve(spec, body_limit=limit),
            path_args=path_args,
            query=Query(head.query),
            target=Target.of(address),
            context={"message": message, "length": head.declared_length},
            pacer=None if decided is not None else self._limiter,
            decided=decided,
            peer=peer,
            digest=digest,
        )

    async def apply_upsert(self, admission: Admission, staging: StagingFile | None) -> Outcome:
        """Apply an admitted upsert whose body (if any) is complete in ``staging``.

        Raises:
            BadFraming: the body length differs from the declared one.
            DigestMismatch: the body is not the one its sender declared.
            KuraError: staging or publishing failed; nothing was stored.
        """
        assert isinstance(admission, ReplicaAdmission) and admission.address is not None
        message: UpsertMessage = admission.context["message"]
        if admission.decided is not None:
            self.count(SOURCE_REPLICATION, ITEM_ARTIFACT, admission.decided)
            return admission.decided
        assert staging is not None
        staged = await staging.finish()
        if staged.size != admission.context["length"]:
            await self._store.discard(staged)
            raise BadFraming("Replicated body length differs from its Content-Length")
        try:
            outcome = await self.publish(
                admission.address,
                message,
                staged,
                source=SOURCE_REPLICATION,
                digest=admission.digest,
            )
        except DigestMismatch:
            what = "signed" if admission.peer.signed else "declared"
            raise DigestMismatch(
                f"Replicated body does not match its {what} SHA-256 digest"
            ) from None
        self._metrics.replication_body_bytes.labels("received").inc(staged.size)
        return outcome

    async def publish(
        self,
        address: ArtifactAddress,
        message: UpsertMessage,
        staged: StagedBody,
        *,
        source: str,
        digest: str | None = None,
    ) -> Outcome:
        """Publish a complete staged body as ``message``'s version (no outbox rows).

        The staged body is consumed whatever happens. A body that does not
        match ``digest`` (what its sender declared) is refused and counted;
        nothing is stored. The publish itself is shielded from cancellation
        (a client that leaves must not interrupt a commit that may already
        be under way).

        Raises:
            DigestMismatch: the body is not the one ``digest`` names.
        """
        # A replica keeps the sender's version and is not replicated again.
        options: dict[str, Any] = {
            "content_type": safe_content_type(message.content_type),
            "policy": WritePolicy.LAST_WRITER_WINS,
            "version_ms": message.version_ms,
            "targets": (),
            "expected_digest": digest,
        }
        if message.inline:
            try:
                value = (
                    staged.data
                    if staged.data is not None
                    else await self._runner.run(_read_file, staged.path)
                )
            finally:
                await self._store.discard(staged)
            work = Deferred.fromCoroutine(self._store.put_inline(address, value, **options))
        else:
            work = Deferred.fromCoroutine(self._store.publish_blob(address, staged, **options))
        try:
            result = await shielded(work)
        except DigestMismatch:
            self._metrics.replication_rejected.labels("digest_mismatch").inc()
            raise
        self.count(source, ITEM_ARTIFACT, result.outcome)
        return result.outcome

    # -- namespace deletes ----------------------------------------------------------------

    async def apply_delete(self, message: DeleteMessage, *, source: str) -> Outcome:
        """Apply a namespace tombstone (no outbox rows)."""
        outcome = await shielded(
            Deferred.fromCoroutine(
                self._store.delete_namespace(message.namespace_id, message.version_ms, targets=())
            )
        )
        self.count(source, ITEM_NAMESPACE, outcome)
        if outcome is Outcome.APPLIED:
            # The clean itself is audited where a client asked for it; each
            # peer records that it carried it out.
            log.info(
                PEER_CLEAN,
                namespace=message.namespace_id,
                version=message.version_ms,
                source=source,
            )
        return outcome

    # -- artifact deletes -----------------------------------------------------------------

    async def apply_artifact_delete(
        self, message: ArtifactDeleteMessage, *, source: str
    ) -> Outcome:
        """Apply one artifact's tombstone (no outbox rows); idempotent."""
        outcome = await shielded(
            Deferred.fromCoroutine(
                self._store.delete_artifact(
                    message.artifact_id, message.namespace_id, message.version_ms, targets=()
                )
            )
        )
        self.count(source, ITEM_ARTIFACT_DELETE, outcome)
        if outcome is Outcome.APPLIED:
            log.debug(
                PEER_DELETE,
                artifact_id=message.artifact_id,
                version=message.version_ms,
                source=source,
            )
        return outcome


def declared_digest(headers: Mapping[str, list[str]]) -> str | None:
    """The body digest an unsigned peer declared (``X-Kura-Content-Sha256``), if any.

    Peers of this release send it whether or not they sign; a previous
    release's unsigned peers do not, and their bodies are stored with the
    digest computed here.

    Raises:
        BadRequest: the header is repeated or is not a lowercase hex SHA-256.
    """
    values = headers.get(DIGEST_HEADER.decode("ascii").lower())
    if not values:
        return None
    if len(values) != 1 or not is_digest(values[0]):
        raise BadRequest("Invalid X-Kura-Content-Sha256: expected one lowercase hex SHA-256")
    return values[0]
