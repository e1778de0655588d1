"""An extension that records every ``authorize`` context, and a spy on what the store is asked.

Loaded with ``KURA_EXTENSION_MODULE=tests.api.hook_recorder:RECORDER`` by the
hook-context contract tests (in-process nodes, so the test reads the same
object). Results are never cached (TTL 0): every request reaches the hook.
"""

from __future__ import annotations

from typing import Any

import attrs

from kura.auth import Allow, HookContext, Principal
from kura.storage.store import ArtifactStore


class Recorder:
    """Allows everything and keeps every context ``authorize`` saw."""

    def __init__(self) -> None:
        self.contexts: list[HookContext] = []

    def authenticate(self, ctx: HookContext) -> Principal:
        return Principal("recorder", ttl_seconds=0)

    def authorize(self, ctx: HookContext, principal: Principal | None) -> Allow:
        self.contexts.append(ctx)
        return Allow(ttl_seconds=0)


RECORDER = Recorder()


@attrs.frozen
class Touch:
    """One thing a handler asked the store about: an artifact or a namespace."""

    kind: str  # "artifact" or "namespace"
    value: str


class StoreSpy:
    """Records which artifact ids and namespaces a node's store is asked about.

    Wraps the store's entry points in place (the node keeps the same object).
    """

    def __init__(self, store: ArtifactStore) -> None:
        self.touched: list[Touch] = []
        self._store = store
        for name in ("cached_manifest", "manifest", "stored"):
            self._wrap(name, lambda artifact_id, *a, **k: [("artifact", artifact_id)])
        for name in ("publish_blob", "put_inline"):
            self._wrap(name, lambda address, *a, **k: [("artifact", self._id(address))])
        self._wrap(
            "complete_upload",
            lambda upload, parts, address, *a, **k: [("artifact", self._id(address))],
        )
        self._wrap("remove_local", lambda manifest, *a, **k: [("artifact", manifest.artifact_id)])
        self._wrap("delete_namespace", lambda namespace, *a, **k: [("namespace", namespace)])
        self._wrap("delete_artifact", lambda artifact_id, *a, **k: [("artifact", artifact_id)])
        self._wrap("start_upload", lambda **k: [("namespace", k["namespace_id"])])

    def _id(self, address: Any) -> str:
        return self._store.artifact_id(address)

    def _wrap(self, name: str, describe: Any) -> None:
        original = getattr(self._store, name)

        def spy(*args: Any, **kwargs: Any) -> Any:
            self.touched.extend(Touch(kind, value) for kind, value in describe(*args, **kwargs))
            return original(*args, **kwargs)

        setattr(self._store, name, spy)

    def clear(self) -> None:
        self.touched.clear()
