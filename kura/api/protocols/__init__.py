"""The public cache protocols, one module per family, each listing its routes as data.

Every module holds a class built from what its handlers use (always the
shared :class:`kura.api.artifacts.ArtifactService`, sometimes the store,
metrics or the authorizer) whose ``routes()`` returns its rows of the route
table (:class:`kura.api.table.Route`); only what is specific to the protocol
(keys and addresses, statuses, extra verbs) lives in the module:

* :mod:`.tuist`: Xcode CAS blobs, key-value entries, namespace cleans;
* :mod:`.gradle`: the Tuist plugin's query form and stock Gradle's path forms;
* :mod:`.module`: module cache multipart uploads and reads;
* :mod:`.nx_metro`: Nx and Metro;
* :mod:`.bazel`, :mod:`.ccache`, :mod:`.sccache`, :mod:`.turbo`: the
  neighbouring build tools (their shared conventions: :mod:`.neighbour`).
"""
