"""Metro 0.87 (``metro-cache`` HttpStore, a real ``metro build``) against kura."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from conformance_support import (
    TOKEN,
    Toolchain,
    artifact_counts,
    base_env,
    delta,
    problem_lines,
    run,
    write_files,
)

from tests.support.real import RealNode

CLIENT = "Metro 0.87.1 (HttpStore)"

pytestmark = [pytest.mark.conformance, pytest.mark.timeout(900)]

CONFIG = """
    const fs = require("fs");
    const path = require("path");
    const {HttpStore} = require("metro-cache");

    module.exports = {
      projectRoot: __dirname,
      // node_modules is a symlink into the client cache: watch where it points.
      watchFolders: [fs.realpathSync(path.join(__dirname, "node_modules"))],
      // The HTTP store only: no local file cache to hit instead of kura.
      cacheStores: [
        new HttpStore({
          endpoint: process.env.KURA_URL + "/api/metro/cache",
          headers: {Authorization: "Bearer " + process.env.KURA_TOKEN},
        }),
      ],
      resolver: {useWatchman: false},
    };
"""


def test_metro_second_build_reads_every_module_from_kura(
    kura: RealNode, toolchain: Toolchain, tmp_path: Path, evidence: list[str]
) -> None:
    """A second metro build makes GET 200s and no PUT, and writes the identical bundle."""
    node_modules = toolchain.npm().require()
    root = tmp_path / "metro"
    write_files(
        root,
        {
            "package.json": '{"name": "conformance-metro", "version": "0.0.0"}\n',
            "metro.config.js": CONFIG,
            "index.js": """
                const {greet} = require("./src/greet");
                const {name} = require("./src/name");
                console.log(greet(name));
            """,
            "src/greet.js": 'exports.greet = (who) => "hello " + who;\n',
            "src/name.js": 'exports.name = "kura";\n',
        },
    )
    os.symlink(node_modules, root / "node_modules")
    env = base_env(KURA_URL=kura.url, KURA_TOKEN=TOKEN, CI="true")
    metro = str(node_modules / ".bin" / "metro")

    before = artifact_counts(kura.url, "metro")
    first = run(
        [metro, "build", "index.js", "--out", str(tmp_path / "first.js")], cwd=root, env=env
    )
    after_first = artifact_counts(kura.url, "metro")
    stored = delta(before, after_first, "writes:ok")
    assert stored >= 3, first.output
    assert delta(before, after_first, "reads:ok") == 0

    second = run(
        [metro, "build", "index.js", "--out", str(tmp_path / "second.js")], cwd=root, env=env
    )
    after_second = artifact_counts(kura.url, "metro")

    served = delta(after_first, after_second, "reads:ok")
    assert served == stored
    assert delta(after_first, after_second, "writes:ok") == 0
    assert delta(after_first, after_second, "reads:not_found") == 0
    assert (tmp_path / "first.js").read_bytes() == (tmp_path / "second.js").read_bytes()
    for output in (first.output, second.output):
        assert problem_lines(output, "error", "warn") == [], output
    evidence.append(
        f"second build: {served:.0f} GET 200, 0 PUT, identical bundle; "
        f"builds {first.seconds:.1f}s + {second.seconds:.1f}s"
    )
