"""Durable artifact storage: SQLite metadata, blob files, staging, eviction.

Nothing in this package knows about HTTP. Blocking work (file writes, fsync,
SQLite) runs through an injected :class:`~kura.storage.interfaces.IBlockingRunner`
so the reactor thread never waits on the disk.
"""
