"""The replication mesh: every write on any node reaches every peer.

Replication is leaderless, full (every node stores everything) and
eventually consistent, delivered at least once with last-writer-wins on
``version_ms``. Its parts, each in its own module:

``membership``
    seed peers plus DNS discovery, polled every 2 s; admits a peer only when
    its ``/_internal/status`` reports our tenant and another node URL; bumps
    a generation and opens a 5 s settle window on every change; it is the
    :class:`~kura.lifecycle.IMembershipView` readiness renders.
``internal``
    the internal plane (a separate Klein app on ``KURA_INTERNAL_PORT``):
    status, the receiver of replicated writes, and the catch-up routes.
``receiver``
    decides stale/equal/tombstoned writes before reading their bodies and
    applies the rest with the public write path's durable order.
``outbox``
    delivers the durable outbox rows with treq: bodies streamed from the blob
    file, per-target backoff, stall detection by byte progress.
``bootstrap``
    catch-up from each known peer: tombstones, then manifests, then the
    bodies this node lacks.
``limiter``
    the one adaptive bandwidth limiter per node that paces every peer body
    byte (uploads, ingest, catch-up on both sides) and backs off while
    public traffic is busy; it never touches public traffic.
``wire``, ``bodies``, ``client``, ``tls``
    message formats, body producers/consumers, the treq peer client and
    optional peer mTLS.
``service``
    :class:`~kura.replication.service.ReplicationService`, which owns it all.

The protocol and its formats are documented in ``docs/replication.md``.
"""
