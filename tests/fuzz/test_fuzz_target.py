"""The atheris fuzz target runs here without atheris, so ``make test`` keeps it honest."""

from __future__ import annotations

import pathlib

import pytest

from kura.accel.classify import Classifier
from kura.service import KuraNode
from tests.accel import test_head_differential
from tests.fuzz import fuzz_head


@pytest.fixture
def one_input(node: KuraNode) -> fuzz_head.Callable[[bytes], None]:
    return fuzz_head.fuzz_target(Classifier(node.gate.routes, "default"))


def test_every_seed_passes(
    one_input: fuzz_head.Callable[[bytes], None], tmp_path: pathlib.Path
) -> None:
    """The seed corpus (valid, malformed, smuggling and route heads) holds every property."""
    corpus = tmp_path / "corpus"
    fuzz_head.seed_corpus(corpus)
    seeds = sorted(corpus.iterdir())
    assert len(seeds) == len(fuzz_head.CASES) + len(fuzz_head.ROUTE_SEEDS)
    for seed in seeds:
        one_input(seed.read_bytes())


def test_a_lax_parser_is_caught(
    one_input: fuzz_head.Callable[[bytes], None], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Serving a smuggling head (as a lax parser would) fails the target."""
    lax = test_head_differential.lax_parse
    monkeypatch.setattr(fuzz_head, "parse_head", lax)
    monkeypatch.setattr(test_head_differential, "parse_head", lax)
    monkeypatch.setattr(fuzz_head, "find_head_end", lambda data, start: lax(data).length)
    monkeypatch.setattr(
        test_head_differential, "find_head_end", lambda data, start: lax(data).length
    )
    smuggling = test_head_differential.case_data("CL carrying the next request")
    with pytest.raises(AssertionError):
        one_input(smuggling)
