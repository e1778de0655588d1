"""Why the accelerator hands a request to twisted.web.

Each reason is a ``reason`` label of ``kura_accelerator_fallbacks_total``
(operators graph them, so they never change). Every fall-back happens
before a byte of the request is consumed, and twisted.web then answers with
its full rules.

=================== =========================================================
reason              the connection or request went to twisted.web because
=================== =========================================================
``disabled``        the accelerator is switched off (the kill switch)
``h2c``             the client opened with the HTTP/2 prior-knowledge preface
``head_too_large``  the head grew past 16 KiB without ending
``head_timeout``    the head did not arrive within the head deadline
``ambiguous``       a ``GET ... HTTP/1.1`` head outside the strict subset every
                    parser agrees on (a real parse hand-off)
``method``          not a ``GET`` over HTTP/1.1: a write, a ``HEAD``, HTTP/1.0
                    (simply not a download)
``route``           no accelerable route matches the path
``query``           the query needs decoding (``%``, ``+``, ``;``) or has a
                    field without ``=``
``request``         the route's resolver refuses the target (tenant, ids,
                    a repeated parameter)
``draining``        the node is draining
``saturated``       every transfer permit is taken
``lookup_error``    looking the artifact up failed
``miss``            the artifact is not stored
``inline``          the artifact's body is in the database and not held in
                    memory (a key-value entry, or a small blob twisted.web
                    reads back, and holds for the next request)
``open``            its file (or a splice pipe) could not be opened, or read
                    to be verified
``range_or_damage`` its file's size differs from the manifest's, its bytes
                    do not match the manifest's digest (the artifact is
                    forgotten: twisted.web answers the miss), or the range
                    is not satisfiable (twisted.web answers after
                    authorization, so a 416 never leaks a size)
=================== =========================================================
"""

from __future__ import annotations

from typing import Final

DISABLED: Final = "disabled"
H2C: Final = "h2c"
HEAD_TOO_LARGE: Final = "head_too_large"
HEAD_TIMEOUT: Final = "head_timeout"
AMBIGUOUS: Final = "ambiguous"
METHOD: Final = "method"
ROUTE: Final = "route"
QUERY: Final = "query"
REQUEST: Final = "request"
DRAINING: Final = "draining"
SATURATED: Final = "saturated"
LOOKUP_ERROR: Final = "lookup_error"
MISS: Final = "miss"
INLINE: Final = "inline"
OPEN: Final = "open"
RANGE_OR_DAMAGE: Final = "range_or_damage"

#: Every reason, in the order of the table above.
ALL: Final = (
    DISABLED,
    H2C,
    HEAD_TOO_LARGE,
    HEAD_TIMEOUT,
    AMBIGUOUS,
    METHOD,
    ROUTE,
    QUERY,
    REQUEST,
    DRAINING,
    SATURATED,
    LOOKUP_ERROR,
    MISS,
    INLINE,
    OPEN,
    RANGE_OR_DAMAGE,
)
