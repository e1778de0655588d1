"""The previous release's source, for mixed-version mesh and upgrade tests.

A rolling upgrade runs nodes of two releases side by side, so the tests run
the last release itself, not an imitation of it: its tree is extracted from
this repository's history (``git archive``) once per session and a
:class:`~tests.support.real.RealNode` given ``source=`` imports it instead of
the working tree.
"""

from __future__ import annotations

import io
import os
import subprocess
import tarfile

import pytest

from tests.support.real import REPO_ROOT

#: The last release before metadata schema 2 and the digest-carrying wire
#: (stop 20 landed it): schema 1, bodies verified only when signed.
PREVIOUS_RELEASE = "53dafc1"
#: The last release before metadata schema 4 (stop 24): schema 3, every
#: small body in a file of its own.
SCHEMA_3_RELEASE = "2a40bad"


def previous_release(directory: str, commit: str = PREVIOUS_RELEASE) -> str:
    """Extract ``commit`` (a release) under ``directory`` (once); return its root.

    Skips the calling test when the checkout has no history to extract it from
    (a shallow clone); CI clones ``main`` whole.
    """
    root = os.path.join(directory, f"kura-{commit}")
    if os.path.isdir(os.path.join(root, "kura")):
        return root
    try:
        archive = subprocess.run(
            ["git", "archive", "--format=tar", commit, "kura", "twisted"],
            cwd=REPO_ROOT,
            check=True,
            capture_output=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError) as error:  # pragma: no cover - shallow
        pytest.skip(f"release {commit} is not in this checkout's history: {error}")
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(root, filter="data")
    return root
