"""Built-in public access rules: read and write tokens, anonymous reads, deletes.

Teams without an extension protect the public port with tokens
(``KURA_AUTH_TOKENS_FILE``, ``KURA_AUTH_READ_TOKENS``,
``KURA_AUTH_WRITE_TOKENS``). Tokens are kept only as SHA-256 digests, so a
memory dump or a log line never holds one, and a token file may list
``sha256:<hex>`` digests instead of the tokens themselves.

:class:`AccessConfig` is the parsed, validated form; the authorizers that
apply it live in :mod:`kura.auth.builtin`.
"""

from __future__ import annotations

import enum
import hashlib
import re

import attrs

from kura.config.environ import Declarations, Reader, Variable

_var = Declarations()
_ACCESS = "Public access"
TOKENS_FILE = _var(
    _ACCESS,
    "KURA_AUTH_TOKENS_FILE",
    None,
    "A file of `read <token> [name]` / `write <token> [name]` lines (`#` comments); a "
    "token may be given as `sha256:<64 hex>` instead. Clients send `Authorization: Bearer "
    "<token>` or Basic auth with the token as password. Write tokens also read.",
)
READ_TOKENS = _var(
    _ACCESS, "KURA_AUTH_READ_TOKENS", None, "Comma-separated read tokens (as in the file)."
)
WRITE_TOKENS = _var(_ACCESS, "KURA_AUTH_WRITE_TOKENS", None, "Comma-separated write tokens.")
ANONYMOUS_READ = _var(
    _ACCESS,
    "KURA_AUTH_ANONYMOUS_READ",
    False,
    "`true`: with tokens configured, reads need none (writes still do).",
)
ALLOW_ANONYMOUS_DELETE = _var(
    _ACCESS,
    "KURA_ALLOW_ANONYMOUS_DELETE",
    False,
    "`true`: in open mode (no tokens, no extension) anonymous callers may clean "
    "namespaces and delete entries. Otherwise those need a write token.",
)
METRICS_TOKEN = _var(
    _ACCESS,
    "KURA_METRICS_TOKEN",
    None,
    "When set, `/metrics` answers only `Authorization: Bearer <this token>`.",
)
STATUS_TOKEN = _var(
    _ACCESS,
    "KURA_STATUS_TOKEN",
    None,
    "When set, `/status/*` answers only `Authorization: Bearer <this token>` "
    "(`/up` and `/ready` stay open for probes).",
)
#: The public access variables, in documentation order.
ACCESS_VARIABLES = tuple(_var.variables)


class Scope(enum.Enum):
    """What a token may do: read, or read and write (deletes included)."""

    READ = "read"
    WRITE = "write"


#: The shortest token accepted: guessing 16 random characters is out of reach.
MIN_TOKEN_LENGTH = 16
_DIGEST = re.compile(r"sha256:([0-9a-f]{64})")
#: Tokens are visible ASCII without separators (they travel in headers and
#: comma lists), the alphabet of RFC 6750 bearer tokens.
_TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")


def token_digest(token: str | bytes) -> bytes:
    """The SHA-256 digest kura keeps instead of a token."""
    raw = token if isinstance(token, bytes) else token.encode("utf-8", "surrogatepass")
    return hashlib.sha256(raw).digest()


@attrs.frozen(repr=False)
class AccessToken:
    """One configured token, known only by its digest.

    Attributes:
        scope: what the token may do.
        digest: SHA-256 of the token.
        name: how the audit log names its holder (``token-<8 hex>`` when the
            configuration gives no name).
    """

    scope: Scope
    digest: bytes
    name: str

    def __repr__(self) -> str:
        return f"AccessToken({self.scope.value}, {self.name})"


@attrs.frozen
class AccessConfig:
    """The public port's built-in access rules.

    Attributes:
        tokens: every configured token; empty means no token mode.
        anonymous_read: with tokens, reads need none.
        allow_anonymous_delete: in open mode, anonymous cleans and deletes
            are allowed.
        metrics_token: digest of the bearer token ``/metrics`` requires.
        status_token: digest of the bearer token ``/status/*`` requires.
    """

    tokens: tuple[AccessToken, ...] = ()
    anonymous_read: bool = ANONYMOUS_READ.default
    allow_anonymous_delete: bool = ALLOW_ANONYMOUS_DELETE.default
    metrics_token: bytes | None = None
    status_token: bytes | None = None

    @property
    def uses_tokens(self) -> bool:
        return bool(self.tokens)

    @classmethod
    def read(cls, read: Reader) -> AccessConfig:
        """Parse the public access variables with ``read``, which collects problems."""
        tokens = _tokens(read, READ_TOKENS, Scope.READ) + _tokens(read, WRITE_TOKENS, Scope.WRITE)
        path = read.optional_text(TOKENS_FILE)
        if path is not None:
            try:
                with open(path, encoding="utf-8") as handle:
                    tokens += parse_token_lines(handle.read())
            except OSError as error:
                read.fail(TOKENS_FILE, f"cannot be read: {error.strerror}")
            except (ValueError, UnicodeDecodeError) as error:
                read.fail(TOKENS_FILE, f"is invalid: {error}")
            else:
                if not tokens:
                    read.fail(TOKENS_FILE, f"file {path!r} lists no token")
        return cls(
            tokens=tuple(tokens),
            anonymous_read=read.boolean(ANONYMOUS_READ),
            allow_anonymous_delete=read.boolean(ALLOW_ANONYMOUS_DELETE),
            metrics_token=_bearer_digest(read, METRICS_TOKEN),
            status_token=_bearer_digest(read, STATUS_TOKEN),
        )


def _tokens(read: Reader, variable: Variable[None], scope: Scope) -> tuple[AccessToken, ...]:
    found = []
    for item in read.items(variable):
        try:
            found.append(parse_token(item, scope))
        except ValueError as error:
            read.fail(variable, f"holds an invalid token: {error}")
    return tuple(found)


def _bearer_digest(read: Reader, variable: Variable[None]) -> bytes | None:
    value = read.optional_text(variable)
    if value is None:
        return None
    try:
        return parse_token(value, Scope.READ).digest
    except ValueError as error:
        read.fail(variable, f"is invalid: {error}")
        return None


def parse_token(text: str, scope: Scope, name: str | None = None) -> AccessToken:
    """One token (or ``sha256:<hex>`` digest) of ``scope``.

    Raises:
        ValueError: the token is too short or has characters outside the
            bearer-token alphabet (the message never contains the token).
    """
    match = _DIGEST.fullmatch(text)
    if match is not None:
        digest = bytes.fromhex(match.group(1))
    else:
        if len(text) < MIN_TOKEN_LENGTH:
            raise ValueError(f"a token must have at least {MIN_TOKEN_LENGTH} characters")
        if not _TOKEN.fullmatch(text):
            raise ValueError("a token may only hold letters, digits and -._~+/ (then =)")
        digest = token_digest(text)
    return AccessToken(scope, digest, name or f"token-{digest.hex()[:8]}")


def parse_token_lines(content: str) -> tuple[AccessToken, ...]:
    """The tokens of a token file: ``read|write <token> [name]`` per line.

    Blank lines and ``#`` comments are skipped.

    Raises:
        ValueError: naming the first bad line by number (never its token).
    """
    tokens = []
    for number, line in enumerate(content.splitlines(), start=1):
        fields = line.split("#", 1)[0].split()
        if not fields:
            continue
        if len(fields) not in (2, 3) or fields[0] not in ("read", "write"):
            raise ValueError(f"line {number} must be `read|write <token> [name]`")
        try:
            tokens.append(parse_token(fields[1], Scope(fields[0]), *fields[2:]))
        except ValueError as error:
            raise ValueError(f"line {number}: {error}") from None
    return tuple(tokens)
