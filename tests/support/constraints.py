"""``constraints.txt``: the exact runtime dependency versions kura is built with.

Two builds of one commit must run the same code, so the Dockerfile and the
Makefile (hence CI and the README's commands) install with
``pip install -c constraints.txt``. The file pins the runtime closure of
``kura[h2]`` (what the image ships) as this virtualenv has it; regenerate
it after changing dependencies with ``make constraints``, and
``tests/test_dockerfile.py`` fails while it is stale.
"""

from __future__ import annotations

import re
import sys
from importlib import metadata

from packaging.requirements import Requirement

HEADER = (
    "# The runtime closure of kura[h2], pinned (see tests/support/constraints.py).\n"
    "# Regenerate with `make constraints` after changing setup.py's dependencies.\n"
)


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def runtime_closure(root: str = "kura", extras: tuple[str, ...] = ("h2",)) -> dict[str, str]:
    """``{distribution: version}`` of everything ``root[extras]`` needs here."""
    found: dict[str, str] = {}
    seen: set[tuple[str, str]] = set()
    pending = [(root, extra) for extra in ("", *extras)]
    while pending:
        name, extra = pending.pop()
        if (_canonical(name), extra) in seen:
            continue
        seen.add((_canonical(name), extra))
        for line in metadata.distribution(name).requires or ():
            requirement = Requirement(line)
            marker = requirement.marker
            if marker is not None and not marker.evaluate({"extra": extra}):
                continue
            found[_canonical(requirement.name)] = metadata.version(requirement.name)
            pending += [(requirement.name, e) for e in ("", *requirement.extras)]
    return dict(sorted(found.items()))


def render() -> str:
    return HEADER + "".join(f"{name}=={version}\n" for name, version in runtime_closure().items())


if __name__ == "__main__":
    sys.stdout.write(render())
