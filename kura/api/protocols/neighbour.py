"""What the neighbouring protocols' routes have in common (Bazel, ccache, sccache, Turborepo).

Stock clients that were not written for kura get a plain content cache on
the same store as kura's own protocols. None of them can name a tenant, so
their artifacts belong to the node's tenant and the hooks see tenant
``default`` (as for Nx and Metro). Every route goes through admission, the
extension hooks, the accelerator (GETs) and replication like kura's own.
Reads answer a miss (404) on storage trouble: a cache in trouble must never
fail a build. Keys are validated strictly (a clear 400 names what is wrong);
they are only ever hashed into artifact ids, never used as file names.
"""

from __future__ import annotations

from kura.web.routing import GiB

#: Uploads larger than this are refused with 413 (every neighbour client
#: treats a failed store as "not stored" and carries on).
NEIGHBOUR_BODY_LIMIT = 2 * GiB
