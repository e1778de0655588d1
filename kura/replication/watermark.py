"""A peer's durable catch-up state: where a walk of its manifests resumes, and since when.

One JSON document per peer in ``peer_watermarks`` (keyed by the node URL the
peer reports), saved after every page whose items were all durably applied,
so it is never ahead of what this node holds.

**What the watermark means.** ``synced_ms`` is this node's clock at the start
of the newest pass that walked a peer's manifests to the end. Every version
the peer held then, above the pass's floor, was resolved here. Versions are
the writers' wall clocks, which the mesh keeps within
``KURA_MAX_CLOCK_SKEW_MS`` of each other (a version further ahead is
refused), so anything written anywhere after that instant carries a version
above ``synced_ms - skew``. The next pass therefore only lists the peer's
manifests with ``version_ms > synced_ms - skew``, newest first: after the
first full pass, a restart or a peer's return costs what changed, not the
store. (A write that reaches the peer later than the skew after its version
was written, through a long-stuck outbox, is not listed again: its writer's
outbox row for *this* node delivers it, as it always did; catch-up is the
backstop, the outbox the primary path.)

**Segments.** A pass is a list of walks (*segments*), done first to last:

* the first pass is one segment with no floor (everything, newest first);
* a later pass is one *head* segment with the floor above;
* a pass interrupted (a restart, or the peer left and came back) resumes
  with a new head for what changed since the interrupted pass began, then
  the interrupted segment from its cursor. An interrupted head is itself
  walked again from the top (it only holds what changed lately), so there
  are never more than two segments and a full pass is never walked twice;
* a peer of an earlier release answers artifact-id-ordered pages without a
  floor: its segments become one id-order walk (its cursor kept across
  restarts too), and each new pass walks it whole, as that release did.

Every segment records the totals its first page announced and what was
walked since, so the remaining work is known (an estimate: the peer keeps
changing while it is walked; a previous-release peer announces nothing).
"""

from __future__ import annotations

import json
from typing import Any

import attrs

#: Segment modes: a recency walk (``order=recent``) or an artifact-id walk.
RECENT = "recent"
BY_ID = "id"
#: The document's format version.
FORMAT = 1


@attrs.define
class Segment:
    """One walk of a peer's manifests.

    Attributes:
        mode: :data:`RECENT` or :data:`BY_ID`.
        since: the floor (versions strictly above it), ``None`` for all.
        started_ms: this node's clock when the walk began.
        head: a walk of what changed since an earlier pass.
        after: the cursor of the next page (``None``: from the top).
        total_items: items the walk's first page announced (``None``: unknown).
        total_bytes: their bytes.
        done_items: items walked (resolved here: applied or already present).
        done_bytes: their bytes.
    """

    mode: str
    since: int | None
    started_ms: int
    head: bool = False
    after: str | None = None
    total_items: int | None = None
    total_bytes: int | None = None
    done_items: int = 0
    done_bytes: int = 0

    def restart(self, now_ms: int) -> None:
        """Walk again from the top (progress and totals forgotten)."""
        self.after = None
        self.started_ms = now_ms
        self.total_items = self.total_bytes = None
        self.done_items = self.done_bytes = 0


@attrs.define
class Watermark:
    """A peer's catch-up state (see the module docstring).

    Attributes:
        synced_ms: the start of the newest pass walked to the end, or ``None``.
        pass_ms: the start of the pass under way (what ``synced_ms`` becomes).
        segments: the walks still to do, first first.
        passes: passes completed (for operators).
    """

    synced_ms: int | None = None
    pass_ms: int | None = None
    segments: list[Segment] = attrs.Factory(list)
    passes: int = 0

    # -- planning ---------------------------------------------------------------------

    def begin(self, now_ms: int, skew_ms: int, *, resumed: bool) -> None:
        """Plan a run.

        Args:
            now_ms: this node's clock.
            skew_ms: ``KURA_MAX_CLOCK_SKEW_MS``.
            resumed: the run starts a new session with the peer (this
                process's first, or the peer came back); a retry within a
                session just continues the cursor.
        """
        if not self.segments:
            since = None if self.synced_ms is None else max(0, self.synced_ms - skew_ms)
            self.segments = [Segment(RECENT, since, now_ms, head=since is not None)]
            self.pass_ms = now_ms
            return
        if not resumed:
            return
        first = self.segments[0]
        if first.head and first.mode == RECENT:
            first.restart(now_ms)
        else:
            floor = self.pass_ms if self.pass_ms is not None else first.started_ms
            self.segments.insert(0, Segment(RECENT, max(0, floor - skew_ms), now_ms, head=True))
        self.pass_ms = now_ms

    def fall_back_to_id_order(self) -> None:
        """The peer answered in artifact-id order: one id walk (an id cursor is kept)."""
        kept = next((s for s in self.segments if s.mode == BY_ID), None)
        if kept is None:
            kept = Segment(BY_ID, None, self.pass_ms or 0)
        self.segments = [kept]

    def page_done(self, next_after: str | None, items: int, size: int) -> None:
        """Record a page of the first segment as resolved (all its items applied)."""
        segment = self.segments[0]
        segment.done_items += items
        segment.done_bytes += size
        segment.after = next_after
        if next_after is None:
            self.segments.pop(0)
            if not self.segments:
                self.synced_ms = self.pass_ms
                self.passes += 1

    # -- progress -----------------------------------------------------------------------

    @property
    def done(self) -> bool:
        return not self.segments

    def progress(self) -> tuple[int, int, int | None, int | None]:
        """``(items done, bytes done, items remaining, bytes remaining)`` of the pass.

        Remaining counts are ``None`` while a segment's total is unknown.
        """
        items = sum(s.done_items for s in self.segments)
        size = sum(s.done_bytes for s in self.segments)
        if any(s.total_items is None or s.total_bytes is None for s in self.segments):
            return items, size, None, None
        left_items = sum(max(0, (s.total_items or 0) - s.done_items) for s in self.segments)
        left_bytes = sum(max(0, (s.total_bytes or 0) - s.done_bytes) for s in self.segments)
        return items, size, left_items, left_bytes

    # -- the stored document ------------------------------------------------------------

    def to_json(self) -> str:
        document = {"format": FORMAT, **attrs.asdict(self)}
        return json.dumps(document, separators=(",", ":"), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | None) -> Watermark:
        """The stored state; a missing or unreadable document is a fresh state.

        An unreadable one (another format) costs one full pass, never a wrong skip.
        """
        if text is None:
            return cls()
        try:
            data: Any = json.loads(text)
            if not isinstance(data, dict) or data.get("format") != FORMAT:
                return cls()
            segments = [_segment(s) for s in data.get("segments", [])]
            return cls(
                synced_ms=_optional_int(data.get("synced_ms")),
                pass_ms=_optional_int(data.get("pass_ms")),
                segments=segments,
                passes=int(data.get("passes", 0)),
            )
        except (ValueError, TypeError, KeyError):
            return cls()


def _optional_int(value: Any) -> int | None:
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError("not an integer")
    return value


def _segment(data: Any) -> Segment:
    if not isinstance(data, dict) or data.get("mode") not in (RECENT, BY_ID):
        raise ValueError("bad segment")
    after = data.get("after")
    if after is not None and not isinstance(after, str):
        raise ValueError("bad cursor")
    started = _optional_int(data.get("started_ms"))
    return Segment(
        mode=data["mode"],
        since=_optional_int(data.get("since")),
        started_ms=started or 0,
        head=bool(data.get("head", False)),
        after=after,
        total_items=_optional_int(data.get("total_items")),
        total_bytes=_optional_int(data.get("total_bytes")),
        done_items=_optional_int(data.get("done_items")) or 0,
        done_bytes=_optional_int(data.get("done_bytes")) or 0,
    )
