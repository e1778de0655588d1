"""Built-in public access rules: read and write tokens, anonymous reads, deletes.

Teams without an extension protect the public port with tokens
(``KURA_AUTH_TOKENS_FILE``, ``KURA_AUTH_READ_TOKENS``,
``KURA_AUTH_WRITE_TOKENS``), with OIDC ID tokens of one issuer
(``KURA_AUTH_OIDC_*``: a CI's workload identity, no shared secret), or both.
Tokens are kept only as SHA-256 digests, so a memory dump or a log line
never holds one, and a token file may list ``sha256:<hex>`` digests instead
of the tokens themselves.

:class:`AccessConfig` is the parsed, validated form; the authorizers that
apply it live in :mod:`kura.auth.builtin` and :mod:`kura.auth.oidc`.
"""

from __future__ import annotations

import enum
import hashlib
import re

import attrs

from kura.config.environ import Declarations, Reader, Variable
from kura.config.extension import http_url_problem, parse_algorithms

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
OIDC_ISSUER = _var(
    _ACCESS,
    "KURA_AUTH_OIDC_ISSUER",
    None,
    "Accept OIDC ID tokens (JWTs signed with the issuer's public keys) of this issuer, e.g. "
    "`https://token.actions.githubusercontent.com`. Needs KURA_AUTH_OIDC_AUDIENCE and a "
    "_READ_CLAIMS or _WRITE_CLAIMS rule. Works alongside the static tokens.",
)
OIDC_AUDIENCE = _var(
    _ACCESS,
    "KURA_AUTH_OIDC_AUDIENCE",
    None,
    "Comma-separated; a token's `aud` must name one of them (required with the issuer).",
)
OIDC_JWKS_URL = _var(
    _ACCESS,
    "KURA_AUTH_OIDC_JWKS_URL",
    None,
    "The issuer's JSON Web Key Set; fetched at start, refreshed per its Cache-Control "
    "(5 min..24 h, default 1 h) and on an unknown `kid` (at most every 30 s).",
    shown="discovered from <issuer>/.well-known/openid-configuration",
)
OIDC_ALGORITHMS = _var(
    _ACCESS,
    "KURA_AUTH_OIDC_ALGORITHMS",
    "RS256,ES256,EdDSA",
    "Accepted algorithms, among RS256/384/512, PS256/384/512, ES256/384/512 and EdDSA.",
)
OIDC_READ_CLAIMS = _var(
    _ACCESS,
    "KURA_AUTH_OIDC_READ_CLAIMS",
    None,
    "Comma-separated `claim=value` pairs; a token whose claims match all of them may read.",
)
OIDC_WRITE_CLAIMS = _var(
    _ACCESS,
    "KURA_AUTH_OIDC_WRITE_CLAIMS",
    None,
    "Comma-separated `claim=value` pairs; a token whose claims match all of them may read "
    "and write (cleans and deletes included), e.g. `repository_owner=acme,ref=refs/heads/main`.",
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


#: A claim rule: every ``(claim, value)`` pair must match (an empty rule matches nothing).
ClaimRule = tuple[tuple[str, str], ...]


@attrs.frozen
class OidcConfig:
    """The built-in OIDC mode (``KURA_AUTH_OIDC_*``).

    Attributes:
        issuer: the one issuer accepted (``iss``, exactly).
        audiences: a token's ``aud`` must name one of them.
        jwks_url: where the keys are; ``None``: discovered from the issuer.
        algorithms: accepted signature algorithms (public-key ones only).
        read_claims: the claims that make a token a read token.
        write_claims: the claims that make a token a write token.
    """

    issuer: str
    audiences: tuple[str, ...]
    jwks_url: str | None = None
    algorithms: tuple[str, ...] = ("RS256", "ES256", "EdDSA")
    read_claims: ClaimRule = ()
    write_claims: ClaimRule = ()


def parse_claim_rule(text: str) -> ClaimRule:
    """``claim=value,claim=value`` as pairs.

    Raises:
        ValueError: an item without ``=`` or with an empty name or value.
    """
    pairs = []
    for item in text.split(","):
        if not item.strip():
            continue
        name, equals, value = item.partition("=")
        if not equals or not name.strip() or not value.strip():
            raise ValueError(f"must be claim=value pairs, got {item.strip()!r}")
        pairs.append((name.strip(), value.strip()))
    return tuple(pairs)


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
        oidc: the OIDC mode, when ``KURA_AUTH_OIDC_ISSUER`` is set.
    """

    tokens: tuple[AccessToken, ...] = ()
    anonymous_read: bool = ANONYMOUS_READ.default
    allow_anonymous_delete: bool = ALLOW_ANONYMOUS_DELETE.default
    metrics_token: bytes | None = None
    status_token: bytes | None = None
    oidc: OidcConfig | None = None

    @property
    def uses_tokens(self) -> bool:
        """Static tokens are configured."""
        return bool(self.tokens)

    @property
    def guarded(self) -> bool:
        """Static tokens or OIDC guard the public port (not open mode)."""
        return bool(self.tokens) or self.oidc is not None

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
            oidc=_oidc(read),
        )


def _oidc(read: Reader) -> OidcConfig | None:
    issuer = read.optional_text(OIDC_ISSUER)
    others = (OIDC_AUDIENCE, OIDC_JWKS_URL, OIDC_READ_CLAIMS, OIDC_WRITE_CLAIMS)
    if issuer is None:
        for variable in others:
            if read.optional_text(variable) is not None:
                read.fail(variable, "needs KURA_AUTH_OIDC_ISSUER")
        return None
    problem = http_url_problem(issuer)
    if problem is not None:
        read.fail(OIDC_ISSUER, problem)
    audiences = tuple(read.items(OIDC_AUDIENCE))
    if not audiences:
        # The audience says the token was minted for this cache: without it
        # a token the issuer minted for any other service would be accepted.
        read.fail(OIDC_AUDIENCE, "must be set with KURA_AUTH_OIDC_ISSUER")
    jwks_url = read.optional_text(OIDC_JWKS_URL)
    if jwks_url is not None and (problem := http_url_problem(jwks_url)) is not None:
        read.fail(OIDC_JWKS_URL, problem)
    algorithms = parse_algorithms(OIDC_ALGORITHMS.default)
    text = read.optional_text(OIDC_ALGORITHMS)
    if text is not None:
        try:
            algorithms = parse_algorithms(text)
        except ValueError as error:
            read.fail(OIDC_ALGORITHMS, str(error))
    rules: dict[str, ClaimRule] = {}
    for variable in (OIDC_READ_CLAIMS, OIDC_WRITE_CLAIMS):
        try:
            rules[variable.name] = parse_claim_rule(read.optional_text(variable) or "")
        except ValueError as error:
            read.fail(variable, str(error))
            rules[variable.name] = ()
    if not any(rules.values()):
        # A public issuer signs tokens for anyone who asks (any GitHub
        # repository can mint one with any audience): the claims must say whose.
        read.fail(
            OIDC_ISSUER,
            "needs KURA_AUTH_OIDC_READ_CLAIMS or KURA_AUTH_OIDC_WRITE_CLAIMS (for example "
            "repository_owner=<your org>): the issuer signs tokens for others too",
        )
    return OidcConfig(
        issuer=issuer,
        audiences=audiences,
        jwks_url=jwks_url,
        algorithms=algorithms,
        read_claims=rules[OIDC_READ_CLAIMS.name],
        write_claims=rules[OIDC_WRITE_CLAIMS.name],
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
