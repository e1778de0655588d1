"""The public HTTP API: the protocols' routes as data, the shared artifact steps, admission.

``app`` composes one Klein app per node from the route table (``table``) that
the protocol modules (``protocols``) and the probes (``probes``) list; they
share ``artifacts`` (find, open, serve, publish, count) and ``handling``.
``gate`` admits requests from their head, ``routes`` derives what a request
acts on, ``authorization`` runs the node's authorizer, ``audit`` logs
destructive requests.
"""
