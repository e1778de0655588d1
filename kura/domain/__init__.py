"""The domain: what an artifact is (identity, manifests, targets), typed errors, crash points.

Nothing here knows about HTTP, Twisted's web layer, storage or configuration.
"""
