"""``KURA_EXTENSION_*``: the extension's configuration.

:data:`EXTENSION_VARIABLES` documents every variable (registered with
``kura.config.environ.VARIABLES`` by :mod:`kura.config`). Besides the fixed
variables there are three families keyed by a resource id, which hooks name
when they call the host (ids are case-insensitive: upper-cased here and in
every host lookup, as upstream does):

* ``KURA_EXTENSION_JWT_VERIFIER_<ID>_{ALGORITHM,SECRET,ISSUER,AUDIENCES}`` (HS*), or
  ``..._{JWKS_URL,ALGORITHMS,ISSUER,AUDIENCES}`` (public keys from a JWKS URL)
* ``KURA_EXTENSION_HTTP_CLIENT_<ID>_{BASE_URL,CONNECT_TIMEOUT_MS,REQUEST_TIMEOUT_MS}``
* ``KURA_EXTENSION_SIGNER_<ID>_{ALGORITHM,SECRET}``

:meth:`ExtensionConfig.from_environ` reports every bad variable in one
:class:`~kura.config.ConfigError`; :meth:`ExtensionConfig.read` adds them to
a reader shared with the rest of the node's configuration instead.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import types
from collections.abc import Mapping
from typing import Any, TypeVar
from urllib.parse import urlsplit

import attrs

from kura.config.environ import ConfigError, Declarations, Reader, Variable

T = TypeVar("T")

_SECTION = "Authorization extension"
_declare = Declarations()


def _variable(name: str, default: T, meaning: str, *, shown: str | None = None) -> Variable[T]:
    return _declare(_SECTION, name, default, meaning, shown=shown)


ENABLED = _variable(
    "KURA_EXTENSION_ENABLED",
    False,
    "Run the authorization extension (1/true/yes/on). Setting KURA_EXTENSION_SCRIPT_PATH "
    "or KURA_EXTENSION_MODULE enables it too, whatever this says.",
)
SCRIPT_PATH = _variable(
    "KURA_EXTENSION_SCRIPT_PATH",
    None,
    "A Python file defining the hooks (see docs/extensions.md). A file that fails to "
    "import stops the node at start-up.",
)
MODULE = _variable(
    "KURA_EXTENSION_MODULE",
    None,
    "The extension as an importable `package.module` or `package.module:attribute`; "
    "an alternative to KURA_EXTENSION_SCRIPT_PATH (set one, not both).",
)
HOOK_TIMEOUT_MS = _variable(
    "KURA_EXTENSION_HOOK_TIMEOUT_MS",
    1_000,
    "Deadline of one hook call. Past it authenticate is a 401 and authorize a 403 "
    "(when fail-closed). Upstream's 25 ms suits in-process Lua; Python hooks that call "
    "an HTTP backend need room for one request.",
)
ALLOW_TTL_SECONDS = _variable(
    "KURA_EXTENSION_AUTH_CACHE_ALLOW_TTL_SECONDS",
    600,
    "How long principal, anonymous and allow results are cached when the hook gives "
    "no ttl_seconds; 0 disables caching them.",
)
DENY_TTL_SECONDS = _variable(
    "KURA_EXTENSION_AUTH_CACHE_DENY_TTL_SECONDS",
    3,
    "How long deny results are cached when the hook gives no ttl_seconds; 0 disables caching them.",
)
CACHE_MAX_ENTRIES = _variable(
    "KURA_EXTENSION_CACHE_MAX_ENTRIES",
    100_000,
    "Entries per hook-result cache (authenticate, authorize). When full, expired entries "
    "are dropped first; if still full the new result is not cached.",
)
AUTH_FAIL_CLOSED = _variable(
    "KURA_EXTENSION_AUTH_FAIL_CLOSED",
    True,
    "When authenticate fails or times out answer 401 `Authentication failed`, and when "
    "authorize does answer 403 `Forbidden`. `false`: treat the caller as anonymous / "
    "allow the request instead.",
)
RESPONSE_HEADERS_FAIL_OPEN = _variable(
    "KURA_EXTENSION_RESPONSE_HEADERS_FAIL_OPEN",
    True,
    "When response_headers fails, send the response without the hook's headers and "
    "with `x-kura-extension-error: response_headers`. `false`: answer 503 instead.",
)
JWT_VERIFIER_ALGORITHM = _variable(
    "KURA_EXTENSION_JWT_VERIFIER_<ID>_ALGORITHM",
    "HS256",
    "Algorithm of JWT verifier <ID>: HS256, HS384 or HS512.",
)
JWT_VERIFIER_SECRET = _variable(
    "KURA_EXTENSION_JWT_VERIFIER_<ID>_SECRET",
    None,
    "Shared HMAC secret of JWT verifier <ID> (its UTF-8 bytes are the key). Required "
    "unless _JWKS_URL is set (not both).",
    shown="(required without _JWKS_URL)",
)
JWT_VERIFIER_JWKS_URL = _variable(
    "KURA_EXTENSION_JWT_VERIFIER_<ID>_JWKS_URL",
    None,
    "http(s) URL of the JSON Web Key Set whose public keys verify <ID>'s tokens "
    "(RS*/PS*/ES*/EdDSA, e.g. CI OIDC ID tokens); fetched at start, refreshed per its "
    "Cache-Control (5 min..24 h, default 1 h) and on an unknown `kid` (at most every 30 s). "
    "Needs _ISSUER and _AUDIENCES; hooks verify with `await host.jwt_verify_async`.",
)
JWT_VERIFIER_ALGORITHMS = _variable(
    "KURA_EXTENSION_JWT_VERIFIER_<ID>_ALGORITHMS",
    "RS256,ES256,EdDSA",
    "With _JWKS_URL: the comma-separated algorithms accepted, among RS256/384/512, "
    "PS256/384/512, ES256/384/512 and EdDSA (never HS* or none).",
)
JWT_VERIFIER_ISSUER = _variable(
    "KURA_EXTENSION_JWT_VERIFIER_<ID>_ISSUER",
    None,
    "When set, tokens must carry this `iss`. Required with _JWKS_URL.",
)
JWT_VERIFIER_AUDIENCES = _variable(
    "KURA_EXTENSION_JWT_VERIFIER_<ID>_AUDIENCES",
    None,
    "Comma-separated; when set, a token's `aud` must name one of them. Required with _JWKS_URL.",
)
HTTP_CLIENT_BASE_URL = _variable(
    "KURA_EXTENSION_HTTP_CLIENT_<ID>_BASE_URL",
    None,
    "http(s) base URL of JSON HTTP client <ID>; hook request paths are appended to it.",
    shown="(required)",
)
HTTP_CLIENT_CONNECT_TIMEOUT_MS = _variable(
    "KURA_EXTENSION_HTTP_CLIENT_<ID>_CONNECT_TIMEOUT_MS",
    500,
    "TCP (and TLS) connect deadline of HTTP client <ID>.",
)
HTTP_CLIENT_REQUEST_TIMEOUT_MS = _variable(
    "KURA_EXTENSION_HTTP_CLIENT_<ID>_REQUEST_TIMEOUT_MS",
    1_500,
    "Deadline of one request attempt of HTTP client <ID>, body included. Network errors "
    "are retried once after 100 ms.",
)
SIGNER_ALGORITHM = _variable(
    "KURA_EXTENSION_SIGNER_<ID>_ALGORITHM",
    "hmac-sha256",
    "Algorithm of response signer <ID>; only hmac-sha256.",
)
SIGNER_SECRET = _variable(
    "KURA_EXTENSION_SIGNER_<ID>_SECRET",
    None,
    "Base64 of the raw HMAC key of signer <ID>.",
    shown="(required)",
)

#: Every extension variable, in documentation order.
EXTENSION_VARIABLES: tuple[Variable[Any], ...] = tuple(_declare.variables)

JWT_ALGORITHMS = ("HS256", "HS384", "HS512")
#: What a JWKS verifier may accept: public-key algorithms only, so a token's
#: ``alg`` can never make a public key serve as an HMAC secret.
JWKS_ALGORITHMS = (
    "RS256",
    "RS384",
    "RS512",
    "PS256",
    "PS384",
    "PS512",
    "ES256",
    "ES384",
    "ES512",
    "EdDSA",
)
SIGNER_ALGORITHMS = ("hmac-sha256",)

_JWT_PREFIX = "KURA_EXTENSION_JWT_VERIFIER_"
_HTTP_PREFIX = "KURA_EXTENSION_HTTP_CLIENT_"
_SIGNER_PREFIX = "KURA_EXTENSION_SIGNER_"
_ID = re.compile(r"[A-Z0-9][A-Z0-9_]*")
_MODULE_PATH = re.compile(
    r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*(:[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*)?"
)


def normalize_id(resource_id: str) -> str:
    """Resource ids are case-insensitive: ``tuist`` names ``..._TUIST_...``."""
    return resource_id.strip().upper()


@attrs.frozen
class JwtVerifierConfig:
    """One ``KURA_EXTENSION_JWT_VERIFIER_<ID>_*`` group: a shared ``secret``
    (HS*), or a ``jwks_url`` with ``algorithms`` (public keys)."""

    algorithm: str
    secret: bytes | None = attrs.field(default=None, repr=False)
    issuer: str | None = None
    audiences: tuple[str, ...] = ()
    jwks_url: str | None = None
    jwks_algorithms: tuple[str, ...] = ()

    @property
    def algorithms(self) -> tuple[str, ...]:
        """The accepted algorithms."""
        return self.jwks_algorithms if self.jwks_url is not None else (self.algorithm,)


def parse_algorithms(text: str) -> tuple[str, ...]:
    """A comma-separated list of :data:`JWKS_ALGORITHMS` (any case; ``EdDSA``
    as PyJWT spells it).

    Raises:
        ValueError: an empty list or an algorithm not allowed.
    """
    known = {name.upper(): name for name in JWKS_ALGORITHMS}
    found: list[str] = []
    for item in text.split(","):
        name = item.strip()
        if not name:
            continue
        if name.upper() not in known:
            raise ValueError(
                f"must list algorithms among {', '.join(JWKS_ALGORITHMS)}, got {name!r}"
            )
        if known[name.upper()] not in found:
            found.append(known[name.upper()])
    if not found:
        raise ValueError("must list at least one algorithm")
    return tuple(found)


def http_url_problem(url: str) -> str | None:
    """Why ``url`` is not an http(s) URL with a host and no fragment (``None``: it is)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return f"must be an http:// or https:// URL with a host, got {url!r}"
    if parts.fragment:
        return f"must not have a fragment, got {url!r}"
    return None


@attrs.frozen
class HttpClientConfig:
    """One ``KURA_EXTENSION_HTTP_CLIENT_<ID>_*`` group."""

    base_url: str
    connect_timeout_ms: int = HTTP_CLIENT_CONNECT_TIMEOUT_MS.default
    request_timeout_ms: int = HTTP_CLIENT_REQUEST_TIMEOUT_MS.default


@attrs.frozen
class SignerConfig:
    """One ``KURA_EXTENSION_SIGNER_<ID>_*`` group (``key`` is the raw key)."""

    key: bytes = attrs.field(repr=False)
    algorithm: str = SIGNER_ALGORITHM.default


def _read_only(value: Mapping[str, object]) -> Mapping[str, object]:
    return types.MappingProxyType(dict(value))


@attrs.frozen
class ExtensionConfig:
    """The extension settings, validated (see the module docstring).

    Attributes:
        environ: the environment the node started with, for the host's
            ``env(name)`` (hooks read their own settings through it).
    """

    enabled: bool = ENABLED.default
    script_path: str | None = None
    module: str | None = None
    hook_timeout_ms: int = HOOK_TIMEOUT_MS.default
    allow_ttl_seconds: int = ALLOW_TTL_SECONDS.default
    deny_ttl_seconds: int = DENY_TTL_SECONDS.default
    cache_max_entries: int = CACHE_MAX_ENTRIES.default
    auth_fail_closed: bool = AUTH_FAIL_CLOSED.default
    response_headers_fail_open: bool = RESPONSE_HEADERS_FAIL_OPEN.default
    jwt_verifiers: Mapping[str, JwtVerifierConfig] = attrs.field(factory=dict, converter=_read_only)
    http_clients: Mapping[str, HttpClientConfig] = attrs.field(factory=dict, converter=_read_only)
    signers: Mapping[str, SignerConfig] = attrs.field(factory=dict, converter=_read_only)
    environ: Mapping[str, str] = attrs.field(
        factory=dict, converter=_read_only, repr=False, eq=False
    )

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> ExtensionConfig:
        """Parse the ``KURA_EXTENSION_*`` variables of ``environ``.

        Raises:
            ConfigError: naming every bad variable, joined with ``"; "``.
        """
        reader = Reader(environ)
        config = cls.read(reader, environ)
        reader.raise_if_failed()
        return config

    @classmethod
    def read(cls, read: Reader, environ: Mapping[str, str]) -> ExtensionConfig:
        """Parse with ``read``, which collects problems instead of raising."""
        script_path = read.optional_text(SCRIPT_PATH)
        module = read.optional_text(MODULE)
        enabled = read.boolean(ENABLED) or script_path is not None or module is not None
        if script_path is not None and module is not None:
            read.fail(MODULE, "cannot be set together with KURA_EXTENSION_SCRIPT_PATH")
        if enabled and script_path is None and module is None:
            read.fail(ENABLED, "needs KURA_EXTENSION_SCRIPT_PATH or KURA_EXTENSION_MODULE")
        if script_path is not None and not os.path.isfile(script_path):
            read.fail(SCRIPT_PATH, f"file {script_path!r} does not exist")
        if module is not None and not _MODULE_PATH.fullmatch(module):
            read.fail(
                MODULE, f"must look like package.module or package.module:attr, got {module!r}"
            )
        return cls(
            enabled=enabled,
            script_path=script_path,
            module=module,
            hook_timeout_ms=read.integer(HOOK_TIMEOUT_MS, minimum=1),
            allow_ttl_seconds=read.integer(ALLOW_TTL_SECONDS),
            deny_ttl_seconds=read.integer(DENY_TTL_SECONDS),
            cache_max_entries=read.integer(CACHE_MAX_ENTRIES, minimum=1),
            auth_fail_closed=read.boolean(AUTH_FAIL_CLOSED),
            response_headers_fail_open=read.boolean(RESPONSE_HEADERS_FAIL_OPEN),
            jwt_verifiers=_jwt_verifiers(read, environ),
            http_clients=_http_clients(read, environ),
            signers=_signers(read, environ),
            environ=environ,
        )


def _groups(
    read: Reader, environ: Mapping[str, str], prefix: str, fields: tuple[str, ...]
) -> dict[str, dict[str, tuple[Variable[None], str]]]:
    """``{ID: {FIELD: (variable, value)}}`` for one family; bad names are reported."""
    groups: dict[str, dict[str, tuple[Variable[None], str]]] = {}
    # Longest field first, so a field that ends with another one wins.
    by_length = sorted(fields, key=len, reverse=True)
    for name in sorted(environ):
        if not name.startswith(prefix):
            continue
        variable = _named(name)
        rest = name[len(prefix) :]
        field = next((f for f in by_length if rest.endswith("_" + f)), None)
        resource = rest[: -len(field) - 1] if field else ""
        if field is None or not _ID.fullmatch(normalize_id(resource)):
            read.fail(variable, f"is not <ID>_{{{','.join(fields)}}} with an ID of A-Z, 0-9, _")
            continue
        groups.setdefault(normalize_id(resource), {})[field] = (variable, environ[name].strip())
    return groups


def _named(name: str) -> Variable[None]:
    """A variable of a family, as set for one resource (named in problems only)."""
    return Variable(name=name, default=None, meaning="", section=_SECTION)


def _family_variable(prefix: str, resource: str, field: str) -> Variable[None]:
    return _named(f"{prefix}{resource}_{field}")


def _jwt_verifiers(read: Reader, environ: Mapping[str, str]) -> dict[str, JwtVerifierConfig]:
    verifiers = {}
    fields = ("ALGORITHM", "ALGORITHMS", "SECRET", "JWKS_URL", "ISSUER", "AUDIENCES")
    for resource, values in _groups(read, environ, _JWT_PREFIX, fields).items():
        issuer = values.get("ISSUER", (None, ""))[1] or None
        audiences = tuple(
            a.strip() for a in values.get("AUDIENCES", (None, ""))[1].split(",") if a.strip()
        )
        secret = values.get("SECRET", (None, ""))[1]
        jwks_url = values.get("JWKS_URL", (None, ""))[1]
        if jwks_url:
            verifier = _jwks_verifier(read, resource, values, jwks_url, issuer, audiences)
            if verifier is not None:
                verifiers[resource] = verifier
            continue
        if "ALGORITHMS" in values:
            read.fail(values["ALGORITHMS"][0], "applies only with _JWKS_URL (HS* use _ALGORITHM)")
            continue
        algorithm = JWT_VERIFIER_ALGORITHM.default
        if "ALGORITHM" in values:
            variable, text = values["ALGORITHM"]
            algorithm = text.upper()
            if algorithm not in JWT_ALGORITHMS:
                read.fail(variable, f"must be one of {', '.join(JWT_ALGORITHMS)}, got {text!r}")
                continue
        if not secret:
            read.fail(
                _family_variable(_JWT_PREFIX, resource, "SECRET"), "must be set (or _JWKS_URL)"
            )
            continue
        verifiers[resource] = JwtVerifierConfig(
            algorithm=algorithm, secret=secret.encode("utf-8"), issuer=issuer, audiences=audiences
        )
    return verifiers


def _jwks_verifier(
    read: Reader,
    resource: str,
    values: dict[str, tuple[Variable[None], str]],
    url: str,
    issuer: str | None,
    audiences: tuple[str, ...],
) -> JwtVerifierConfig | None:
    """The JWKS form of a verifier group, or ``None`` after reporting why not."""
    variable = values["JWKS_URL"][0]
    problems = []
    for field in ("SECRET", "ALGORITHM"):
        if field in values:
            problems.append((values[field][0], "cannot be set with _JWKS_URL"))
    problem = http_url_problem(url)
    if problem is not None:
        problems.append((variable, problem))
    # A public issuer (GitHub's, GitLab's) signs tokens for everyone: without
    # the issuer and audience checks any of its tokens would be accepted.
    if issuer is None:
        problems.append(
            (_family_variable(_JWT_PREFIX, resource, "ISSUER"), "must be set with _JWKS_URL")
        )
    if not audiences:
        problems.append(
            (_family_variable(_JWT_PREFIX, resource, "AUDIENCES"), "must be set with _JWKS_URL")
        )
    algorithms: tuple[str, ...] = ()
    try:
        algorithms = parse_algorithms(
            values.get("ALGORITHMS", (None, JWT_VERIFIER_ALGORITHMS.default))[1]
        )
    except ValueError as error:
        problems.append((_family_variable(_JWT_PREFIX, resource, "ALGORITHMS"), str(error)))
    for bad, text in problems:
        read.fail(bad, text)
    if problems:
        return None
    return JwtVerifierConfig(
        algorithm=algorithms[0],
        issuer=issuer,
        audiences=audiences,
        jwks_url=url,
        jwks_algorithms=algorithms,
    )


def _milliseconds(
    read: Reader, values: dict[str, tuple[Variable[None], str]], family: Variable[int]
) -> int:
    """The field of ``values`` that ``family`` documents, or the family's default."""
    field = family.name.rsplit("<ID>_", 1)[1]
    if field not in values:
        return family.default
    variable, text = values[field]
    if not text.isdigit() or int(text) < 1:
        read.fail(variable, f"must be a positive integer, got {text!r}")
        return family.default
    return int(text)


def _http_clients(read: Reader, environ: Mapping[str, str]) -> dict[str, HttpClientConfig]:
    clients = {}
    fields = ("BASE_URL", "CONNECT_TIMEOUT_MS", "REQUEST_TIMEOUT_MS")
    for resource, values in _groups(read, environ, _HTTP_PREFIX, fields).items():
        connect = _milliseconds(read, values, HTTP_CLIENT_CONNECT_TIMEOUT_MS)
        request = _milliseconds(read, values, HTTP_CLIENT_REQUEST_TIMEOUT_MS)
        if "BASE_URL" not in values or not values["BASE_URL"][1]:
            read.fail(_family_variable(_HTTP_PREFIX, resource, "BASE_URL"), "must be set")
            continue
        variable, url = values["BASE_URL"]
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            read.fail(variable, f"must be an http:// or https:// URL with a host, got {url!r}")
            continue
        if parts.query or parts.fragment:
            read.fail(variable, f"must not have a query or fragment, got {url!r}")
            continue
        clients[resource] = HttpClientConfig(
            base_url=url.rstrip("/"), connect_timeout_ms=connect, request_timeout_ms=request
        )
    return clients


def _signers(read: Reader, environ: Mapping[str, str]) -> dict[str, SignerConfig]:
    signers = {}
    for resource, values in _groups(read, environ, _SIGNER_PREFIX, ("ALGORITHM", "SECRET")).items():
        algorithm = SIGNER_ALGORITHM.default
        if "ALGORITHM" in values:
            variable, text = values["ALGORITHM"]
            algorithm = text.lower().replace("_", "-")
            if algorithm not in SIGNER_ALGORITHMS:
                read.fail(variable, f"must be hmac-sha256, got {text!r}")
                continue
        secret_variable = _family_variable(_SIGNER_PREFIX, resource, "SECRET")
        secret = values.get("SECRET", (None, ""))[1]
        if not secret:
            read.fail(secret_variable, "must be set")
            continue
        try:
            key = base64.b64decode(secret, validate=True)
        except (binascii.Error, ValueError):
            read.fail(secret_variable, "must be base64 of the raw key")
            continue
        if not key:
            read.fail(secret_variable, "must not decode to an empty key")
            continue
        signers[resource] = SignerConfig(key=key, algorithm=algorithm)
    return signers


__all__ = [
    "EXTENSION_VARIABLES",
    "ConfigError",
    "ExtensionConfig",
    "HttpClientConfig",
    "JwtVerifierConfig",
    "SignerConfig",
    "normalize_id",
]
