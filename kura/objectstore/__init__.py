"""The object-store tier: nodes in front of an S3-compatible store (issue 18).

``KURA_OBJECT_STORE_URL=s3://BUCKET/PREFIX`` turns it on. Writes are
acknowledged once durable on the local disk, as without the tier, and then
uploaded by a durable queue (:mod:`.queue`); a local miss is read through
from the store (:mod:`.readthrough`); cleans and deletes are recorded in
the store as tombstones that every node sharing it follows
(:mod:`.tombstones`). The local disk becomes an LRU cache of the store:
eviction only drops what the store already holds.

Modules: :mod:`.client` (botocore, blocking), :mod:`.calls` (the tier's
threads and per-operation metrics), :mod:`.naming` (the bucket's layout),
:mod:`.tier` (the parts of one node).
"""
