"""The twisted.web-facing layer shared by kura's serving paths.

Both the same-port accelerator (:mod:`kura.accel`) and the public HTTP API
(:mod:`kura.api`) hand connections to what lives here; so far that is
HTTP/2 (:mod:`kura.web.h2`). A later restructuring moves more of the
twisted.web glue here.
"""
