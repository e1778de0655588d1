"""The durable catch-up state: passes, heads, resumption, the id-order fallback, progress."""

from __future__ import annotations

from urllib.parse import parse_qs

import pytest

from kura.domain.errors import BadRequest
from kura.replication import wire
from kura.replication.watermark import BY_ID, RECENT, Segment, Watermark

SKEW = 1_000


def walk(state: Watermark, pages: list[tuple[str | None, int, int]]) -> None:
    """Resolve pages of the first segment: ``(next_after, items, bytes)`` each."""
    for next_after, items, size in pages:
        state.page_done(next_after, items, size)


def test_a_first_pass_walks_everything_then_records_its_start() -> None:
    state = Watermark()
    state.begin(10_000, SKEW, resumed=True)
    assert state.segments == [Segment(RECENT, None, 10_000, head=False)]
    walk(state, [("9:a", 2, 20), (None, 1, 5)])
    assert state.done and state.synced_ms == 10_000 and state.passes == 1


def test_a_later_pass_only_lists_what_changed_since_the_watermark_less_the_skew() -> None:
    state = Watermark(synced_ms=10_000, passes=1)
    state.begin(50_000, SKEW, resumed=True)
    assert state.segments == [Segment(RECENT, 9_000, 50_000, head=True)]
    walk(state, [(None, 3, 30)])
    assert state.synced_ms == 50_000 and state.passes == 2


def test_an_interrupted_first_pass_resumes_behind_a_head_of_what_changed_meanwhile() -> None:
    state = Watermark()
    state.begin(10_000, SKEW, resumed=True)
    state.segments[0].total_items, state.segments[0].total_bytes = 10, 100
    walk(state, [("7:c", 4, 40)])
    restored = Watermark.from_json(state.to_json())  # a restart
    assert restored == state
    restored.begin(90_000, SKEW, resumed=True)
    head, rest = restored.segments
    assert head == Segment(RECENT, 9_000, 90_000, head=True)
    assert (rest.after, rest.done_items, rest.since) == ("7:c", 4, None)  # not walked again
    walk(restored, [(None, 2, 20)])  # the head
    assert restored.segments == [rest] and not restored.done
    walk(restored, [(None, 6, 60)])  # the rest, from its cursor
    assert restored.done and restored.synced_ms == 90_000


def test_an_interrupted_head_is_walked_again_whole_and_never_stacks() -> None:
    state = Watermark(synced_ms=10_000)
    state.begin(20_000, SKEW, resumed=True)
    walk(state, [("19:f", 5, 50)])
    state.begin(30_000, SKEW, resumed=True)
    assert state.segments == [Segment(RECENT, 9_000, 30_000, head=True)]
    state.begin(40_000, SKEW, resumed=True)
    assert len(state.segments) == 1


def test_a_retry_within_a_session_continues_the_cursor() -> None:
    state = Watermark()
    state.begin(10_000, SKEW, resumed=True)
    walk(state, [("8:b", 2, 2)])
    state.begin(11_000, SKEW, resumed=False)
    assert [(s.after, s.started_ms) for s in state.segments] == [("8:b", 10_000)]


def test_a_previous_release_peer_gets_one_id_walk_whose_cursor_survives() -> None:
    state = Watermark()
    state.begin(10_000, SKEW, resumed=True)
    state.fall_back_to_id_order()
    assert state.segments == [Segment(BY_ID, None, 10_000)]
    walk(state, [("ab" * 32, 256, 999)])
    state.begin(20_000, SKEW, resumed=True)  # restarted: a recency head first ...
    assert [s.mode for s in state.segments] == [RECENT, BY_ID]
    state.fall_back_to_id_order()  # ... which the old peer answers by id again
    assert [(s.mode, s.after) for s in state.segments] == [(BY_ID, "ab" * 32)]


def test_progress_is_known_only_when_every_segment_announced_its_totals() -> None:
    state = Watermark()
    state.begin(10_000, SKEW, resumed=True)
    assert state.progress() == (0, 0, None, None)
    segment = state.segments[0]
    segment.total_items, segment.total_bytes = 50, 5_000
    walk(state, [("5:x", 12, 1_200)])
    assert state.progress() == (12, 1_200, 38, 3_800)
    # The peer gained items since it counted: never a negative remainder.
    walk(state, [("4:x", 60, 6_000)])
    assert state.progress() == (72, 7_200, 0, 0)


@pytest.mark.parametrize(
    "text", [None, "", "[]", "{}", '{"format": 2}', '{"format": 1, "segments": [{"mode": 3}]}']
)
def test_an_unreadable_document_costs_a_full_pass_never_a_skip(text: str | None) -> None:
    state = Watermark.from_json(text)
    assert state == Watermark()


def test_recency_page_parameters_round_trip_and_are_strict() -> None:
    page = wire.PageRequest(100, wire.recent_cursor(17, "ab" * 32), wire.ORDER_RECENT, 5)
    parsed = wire.PageRequest.parse(parse_qs(wire.encode_query(page.params())))
    assert parsed == page and parsed.recent_cursor() == (17, "ab" * 32)
    # A node of the previous release sends neither order nor since.
    assert wire.PageRequest.parse({"after": ["x"]}) == wire.PageRequest(256, "x")
    for query in (
        {"order": ["oldest"]},
        {"order": ["recent"], "after": ["17:nothex"]},
        {"order": ["recent"], "after": ["x:" + "ab" * 32]},
        {"order": ["recent"], "since": ["-1"]},
    ):
        with pytest.raises(BadRequest):
            wire.PageRequest.parse(query)
