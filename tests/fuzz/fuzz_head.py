"""Coverage-guided fuzzing of the accelerator's head parser and classifier.

Off the default test run (pytest does not collect this file); ``make fuzz``
runs it for ten minutes. Each input is fed to :func:`kura.accel.head.parse_head`
and, when served, to the differential oracles of the unit tests (a real
twisted.web ``HTTPChannel``, h11 and llhttp) and to the node's classifier.
It fails on:

* any exception from the parser or the classifier;
* a served head that any oracle would frame differently (the accelerator
  must never serve what twisted.web parses otherwise);
* parsing slower than :data:`MAX_SECONDS_PER_KIB` per KiB of input, so a
  crafted head cannot buy quadratic work.

libFuzzer options pass through, e.g.
``python tests/fuzz/fuzz_head.py -max_total_time=600 -max_len=17000 corpus/``.
The seed corpus, written into the corpus directory at start, is the unit
tests' corpus of valid, malformed and smuggling heads plus a GET of each
accelerable route.
"""

from __future__ import annotations

import inspect
import pathlib
import sys
import tempfile
import time
import types
from collections.abc import Callable

import kura.service
import kura.testing
from kura.accel import classify as classify_module
from kura.accel import head as head_module
from kura.accel.classify import Candidate, Classifier
from kura.accel.head import MAX_HEAD_BYTES, find_head_end, parse_head
from tests.accel.corpus import CASES
from tests.accel.test_head_differential import check_served


def instrument(*modules: types.ModuleType) -> None:
    """Add coverage feedback to the code under test only (not twisted, not the oracles).

    ``instrument_imports`` cannot do it: the node imports these modules first.
    """
    import atheris

    for module in modules:
        for value in vars(module).values():
            functions = [value] if inspect.isfunction(value) else []
            if inspect.isclass(value):
                functions = [f for f in vars(value).values() if inspect.isfunction(f)]
            for function in functions:
                if function.__module__ == module.__name__:
                    atheris.instrument_func(function)


#: Generous: parsing a full 16 KiB head takes well under a millisecond.
MAX_SECONDS_PER_KIB = 0.005
#: Timing noise floor (a GC pause, a page fault) below which nothing is judged.
MIN_JUDGED_SECONDS = 0.02


#: Heads of real accelerable routes, so mutations reach the route table too.
ROUTE_SEEDS = [
    f"/api/cache/cas/{'a' * 64}?tenant_id=default",
    f"/api/cache/gradle/{'b' * 32}?tenant_id=default&namespace_id=ns",
    f"/api/cache/gradle/default/{'b' * 32}",
    f"/api/cache/module/{'c' * 16}?tenant_id=default&namespace_id=ns&name=Mod&hash=h",
    f"/v1/cache/{'d' * 40}",
    f"/api/metro/cache/{'e' * 40}",
    f"/bazel/cas/{'f' * 64}",
    "/v8/artifacts/0123456789abcdef?slug=team",
]


def _classifier() -> Classifier:
    """The node's real classifier over the real Klein route table."""
    from prometheus_client import CollectorRegistry
    from twisted.internet import reactor

    # The node is never started: nothing is written to its data directory.
    with tempfile.TemporaryDirectory(prefix="kura-fuzz-") as data_dir:
        config = kura.testing.test_config(data_dir)
        node = kura.service.KuraNode(config, reactor, registry=CollectorRegistry())
    return node.accelerator.classifier


def fuzz_target(classifier: Classifier) -> Callable[[bytes], None]:
    """The fuzz target: see the module docstring for what counts as a failure."""

    def one_input(data: bytes) -> None:
        started = time.perf_counter()
        end = find_head_end(data, 0)
        head = parse_head(data)
        elapsed = time.perf_counter() - started
        budget = MAX_SECONDS_PER_KIB * max(1, len(data) / 1024)
        if elapsed > max(budget, MIN_JUDGED_SECONDS):
            raise AssertionError(f"parsing {len(data)} bytes took {elapsed * 1000:.1f} ms")
        if head is None:
            return
        assert head.length == end <= MAX_HEAD_BYTES + 4
        check_served(data)
        assert isinstance(classifier.classify(head), (Candidate, str))

    return one_input


def seed_corpus(directory: pathlib.Path) -> None:
    """Write the unit tests' corpus as seed inputs."""
    directory.mkdir(parents=True, exist_ok=True)
    for index, case in enumerate(CASES):
        (directory / f"seed-{index:04d}").write_bytes(case.data)
    for index, target in enumerate(ROUTE_SEEDS):
        request = f"GET {target} HTTP/1.1\r\nHost: kura:4000\r\nRange: bytes=0-9\r\n\r\n"
        (directory / f"route-{index:04d}").write_bytes(request.encode())


def main(argv: list[str]) -> None:
    import atheris

    one_input = fuzz_target(_classifier())
    instrument(head_module, classify_module)
    directories = [arg for arg in argv[1:] if not arg.startswith("-")]
    if directories:
        seed_corpus(pathlib.Path(directories[0]))
    atheris.Setup(argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
