"""The staging budget: reserved as body bytes arrive, checked against free space at the head."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred

from kura.domain.errors import TmpBudgetExhausted
from kura.domain.failpoints import Failpoints
from kura.storage.runner import ImmediateRunner
from kura.storage.staging import RESERVATION_STEP, StagingFile, TmpBudget
from kura.testing import succeeded

STEP = RESERVATION_STEP


def staging(
    tmp_path: Path, budget: TmpBudget, expected: int | None, name: str = "body"
) -> StagingFile:
    return StagingFile(
        path=str(tmp_path / name),
        runner=ImmediateRunner(),
        budget=budget,
        failpoints=Failpoints(),
        limit=1 << 40,
        expected_length=expected,
    )


def test_declared_length_is_checked_but_not_reserved(tmp_path: Path) -> None:
    """Creating a file for a declared length reserves nothing; its first byte reserves one step."""
    budget = TmpBudget(8 * STEP)
    body = staging(tmp_path, budget, 8 * STEP)
    assert budget.used == 0
    body.write(b"x")
    assert (body.reserved, budget.used) == (STEP, STEP)


def test_reservation_grows_a_step_at_a_time(tmp_path: Path) -> None:
    """The reservation covers what arrived, rounded up to a step, never past the declared length."""
    budget = TmpBudget(8 * STEP)
    body = staging(tmp_path, budget, 2 * STEP + 10)
    body.write(b"x" * STEP)
    assert budget.used == STEP
    body.write(b"x")
    assert budget.used == 2 * STEP
    body.write(b"x" * (STEP - 1))
    assert budget.used == 2 * STEP
    body.write(b"x")
    assert budget.used == 2 * STEP + 10  # the last step is the rest of the declared length
    body.write(b"x" * 9)
    staged = succeeded(Deferred.fromCoroutine(body.finish()))
    assert (staged.size, staged.reserved) == (2 * STEP + 10, 2 * STEP + 10)


def test_unknown_length_reserves_whole_steps(tmp_path: Path) -> None:
    """A body of unknown length reserves whole steps as it grows."""
    budget = TmpBudget(8 * STEP)
    body = staging(tmp_path, budget, None)
    body.write(b"x")
    assert budget.used == STEP
    body.write(b"x" * STEP)
    assert budget.used == 2 * STEP


def test_declared_length_over_the_free_space_is_refused_at_once(tmp_path: Path) -> None:
    """A declared length larger than what is free now is refused before any byte."""
    budget = TmpBudget(4 * STEP)
    budget.reserve(3 * STEP)
    with pytest.raises(TmpBudgetExhausted) as refused:
        staging(tmp_path, budget, STEP + 1)
    assert refused.value.message.startswith("Temporary storage budget exhausted: ")
    assert refused.value.retry_after == 1
    assert budget.used == 3 * STEP
    assert os.listdir(tmp_path) == []
    staging(tmp_path, budget, STEP)  # exactly the free space fits


def test_running_out_mid_body_raises_and_abort_gives_everything_back(tmp_path: Path) -> None:
    """A body whose next step no longer fits is refused; abort frees its file and reservation."""
    budget = TmpBudget(3 * STEP)
    body = staging(tmp_path, budget, 2 * STEP)
    body.write(b"x" * STEP)
    other = staging(tmp_path, budget, 2 * STEP, name="other")  # fits: 2 steps are free
    other.write(b"y" * (STEP + 1))
    assert budget.used == 3 * STEP
    with pytest.raises(TmpBudgetExhausted):
        body.write(b"x")
    assert os.path.exists(tmp_path / "body")
    succeeded(body.abort())
    assert budget.used == 2 * STEP
    assert not os.path.exists(tmp_path / "body")
    other.write(b"y" * (STEP - 1))
    succeeded(Deferred.fromCoroutine(other.finish()))


class Names:
    """Names staging files on demand and counts how often it was asked."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.given = 0

    def __call__(self) -> str:
        self.given += 1
        return str(self.tmp_path / f"small-{self.given}")


def memory_staging(
    tmp_path: Path,
    budget: TmpBudget,
    expected: int,
    runner: Any,
    *,
    hashed: bool = False,
    names: Names | None = None,
) -> StagingFile:
    return StagingFile(
        path=names or Names(tmp_path),
        runner=runner,
        budget=budget,
        failpoints=Failpoints(),
        limit=1 << 20,
        expected_length=expected,
        hashed=hashed,
        in_memory=True,
    )


class CountingRunner(ImmediateRunner):
    """Runs inline and counts the blocking calls (thread hops, in a node)."""

    def __init__(self) -> None:
        self.calls = 0

    def run(self, f: Any, *args: Any, **kwargs: Any) -> Deferred[Any]:
        self.calls += 1
        return super().run(f, *args, **kwargs)


def test_a_small_body_is_kept_in_memory_with_its_budget(tmp_path: Path) -> None:
    """An in-memory body: no file, no blocking call, no hashing on the reactor (its batch
    hashes it on a storage thread), its bytes reserved until published."""
    budget = TmpBudget(8 * STEP)
    runner = CountingRunner()
    names = Names(tmp_path)
    body = memory_staging(tmp_path, budget, 10, runner, hashed=True, names=names)
    body.write(b"01234")
    body.write(b"56789")
    staged = succeeded(Deferred.fromCoroutine(body.finish()))
    assert staged.data == b"0123456789"
    assert staged.sha256 is None
    assert (staged.size, staged.reserved, budget.used) == (10, 10, 10)
    assert runner.calls == 0
    assert os.listdir(tmp_path) == []
    assert names.given == 0  # not even a name was made up for it


def test_an_in_memory_body_is_still_refused_by_the_budget(tmp_path: Path) -> None:
    """The budget counts bodies in memory too: a declared length that cannot fit is refused."""
    with pytest.raises(TmpBudgetExhausted):
        memory_staging(tmp_path, TmpBudget(5), 10, ImmediateRunner())


def test_aborting_an_in_memory_body_releases_its_budget(tmp_path: Path) -> None:
    budget = TmpBudget(8 * STEP)
    runner = CountingRunner()
    body = memory_staging(tmp_path, budget, 10, runner)
    body.write(b"0123")
    succeeded(body.abort())
    assert (budget.used, runner.calls) == (0, 0)


def test_a_body_longer_than_declared_goes_to_the_file(tmp_path: Path) -> None:
    """More bytes than the declared length leave memory for the staging file, all of them."""
    budget = TmpBudget(8 * STEP)
    names = Names(tmp_path)
    body = memory_staging(tmp_path, budget, 4, ImmediateRunner(), names=names)
    body.write(b"0123")
    body.write(b"4567")
    staged = succeeded(Deferred.fromCoroutine(body.finish()))
    assert staged.data is None
    assert (names.given, staged.path) == (1, str(tmp_path / "small-1"))
    with open(staged.path, "rb") as handle:
        assert handle.read() == b"01234567"
    assert staged.reserved == budget.used >= 8  # every byte is reserved, as for staged bodies
