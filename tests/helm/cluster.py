"""A stand-in Kubernetes API server, enough for the chart's ``lookup`` calls.

``helm upgrade`` renders the chart with Helm's ``lookup`` wired to the live
cluster; ``helm template`` (and ``Chart.render``) wire it to nothing, so
every lookup comes back empty. To show what an upgrade renders, the tests
render through ``helm_python.Config.render``, which runs Helm's own engine
with the real client-go ``lookup`` (discovery, then a GET of the object)
against whatever kubeconfig it is given: here, a loopback HTTP server that
holds objects in memory.

It serves what ``lookup "v1" <Kind> <namespace> <name>`` asks for and
nothing more:

* ``GET /api/v1``: discovery of the core group (which resource serves a
  kind, and whether it is namespaced);
* ``GET /api/v1/namespaces/<ns>/<resource>/<name>``: one stored object, or a
  404 ``Status``, which ``lookup`` turns into an empty map.

Anything else is a 404 too, and every request path is recorded in
:attr:`FakeCluster.requests`, so a test can show the lookup really ran.
It does not create, list, watch, validate or default objects: a test stores
what an install would have created with :meth:`FakeCluster.apply`.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any

#: Core-group kinds the server knows (kind -> plural resource name).
CORE_KINDS = {"Secret": "secrets", "ConfigMap": "configmaps", "Service": "services"}


def _status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }


class FakeCluster:
    """In-memory core/v1 objects behind a loopback API server (see the module docstring).

    Use as a context manager; the server runs on a daemon thread until
    :meth:`close`.
    """

    def __init__(self) -> None:
        self.requests: list[str] = []
        self._objects: dict[tuple[str, str, str], dict[str, Any]] = {}
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def apply(self, obj: dict[str, Any], *, namespace: str) -> None:
        """Store the core/v1 ``obj`` in ``namespace``, as Helm creates a release's objects."""
        assert obj["apiVersion"] == "v1" and obj["kind"] in CORE_KINDS, obj["kind"]
        stored = json.loads(json.dumps(obj))
        stored["metadata"]["namespace"] = namespace
        key = (CORE_KINDS[obj["kind"]], namespace, obj["metadata"]["name"])
        with self._lock:
            self._objects[key] = stored

    def kubeconfig(self, namespace: str) -> str:
        """A kubeconfig whose current context talks to this server in ``namespace``."""
        port = self._server.server_port
        return json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "fake", "cluster": {"server": f"http://127.0.0.1:{port}"}}],
                "users": [{"name": "fake", "user": {"token": "fake"}}],
                "contexts": [
                    {
                        "name": "fake",
                        "context": {"cluster": "fake", "user": "fake", "namespace": namespace},
                    }
                ],
                "current-context": "fake",
            }
        )

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    def __enter__(self) -> FakeCluster:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def _get(self, path: str) -> tuple[int, dict[str, Any]]:
        parts = path.split("?", 1)[0].strip("/").split("/")
        if parts == ["api", "v1"]:
            resources = [
                {"name": plural, "namespaced": True, "kind": kind, "verbs": ["get"]}
                for kind, plural in CORE_KINDS.items()
            ]
            return 200, {
                "kind": "APIResourceList",
                "apiVersion": "v1",
                "groupVersion": "v1",
                "resources": resources,
            }
        if len(parts) == 6 and parts[:3] == ["api", "v1", "namespaces"]:
            _, _, _, namespace, resource, name = parts
            with self._lock:
                found = self._objects.get((resource, namespace, name))
            if found is not None:
                return 200, found
            return 404, _status(404, "NotFound", f'{resource} "{name}" not found')
        return 404, _status(404, "NotFound", f"the server could not find {path}")

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        cluster = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                cluster.requests.append(self.path.split("?", 1)[0])
                code, body = cluster._get(self.path)
                payload = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        return Handler
