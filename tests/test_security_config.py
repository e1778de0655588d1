"""The security settings' contract: safe defaults, explicit unsafe switches, no echoed secrets."""

from __future__ import annotations

from pathlib import Path

import pytest

from kura.config import ConfigError, KuraConfig
from kura.config.access import Scope, token_digest

SECRET = "a-mesh-secret-of-thirty-two-bytes!"
MESH = {"KURA_PEERS": "http://b.internal:7443"}


def parse(environ: dict[str, str]) -> KuraConfig:
    return KuraConfig.from_environ(environ, measure_filesystem=lambda path: 1 << 40)


def problems(environ: dict[str, str]) -> str:
    with pytest.raises(ConfigError) as raised:
        parse(environ)
    return str(raised.value)


def test_a_single_node_keeps_its_internal_plane_on_loopback() -> None:
    """Without peers nobody needs the internal plane: it listens on 127.0.0.1 only."""
    assert parse({}).internal_bind_host == "127.0.0.1"
    assert parse({"KURA_BIND_HOST": "0.0.0.0"}).internal_bind_host == "127.0.0.1"


def test_a_node_with_peers_binds_its_internal_plane_with_the_public_one() -> None:
    """With seed peers or DNS discovery the internal plane follows KURA_BIND_HOST."""
    assert parse({**MESH, "KURA_PEER_SECRET": SECRET}).internal_bind_host == "0.0.0.0"
    dns = {"KURA_DISCOVERY_DNS_NAME": "kura-headless", "KURA_PEER_SECRET": SECRET}
    assert parse(dns).internal_bind_host == "0.0.0.0"


@pytest.mark.parametrize("peers", [MESH, {"KURA_DISCOVERY_DNS_NAME": "kura-headless"}])
def test_a_mesh_without_peer_authentication_refuses_to_start(peers: dict[str, str]) -> None:
    """Peers without a secret or mTLS names stop the node with one clear message."""
    message = problems(peers)
    assert "KURA_PEER_SECRET" in message
    assert "KURA_INTERNAL_TLS_PEER_NAMES" in message
    assert "KURA_INTERNAL_INSECURE=true" in message


def test_an_explicitly_insecure_mesh_starts() -> None:
    """KURA_INTERNAL_INSECURE=true is the explicit opt-out (warned at every start)."""
    config = parse({**MESH, "KURA_INTERNAL_INSECURE": "true"})
    assert config.replication.auth.insecure
    assert not config.replication.authenticates_peers


def test_insecure_contradicts_a_configured_secret() -> None:
    """Asking for both a secret and no authentication is refused, not guessed."""
    assert "KURA_INTERNAL_INSECURE" in problems(
        {**MESH, "KURA_PEER_SECRET": SECRET, "KURA_INTERNAL_INSECURE": "true"}
    )


def test_a_short_secret_is_refused_without_being_echoed() -> None:
    """A secret under 32 bytes is refused; the message gives its length, never its value."""
    message = problems({**MESH, "KURA_PEER_SECRET": "hunter2-is-not-enough"})
    assert "at least 32 bytes, got 21" in message
    assert "hunter2" not in message


def test_the_secret_may_come_from_a_file_but_not_from_both(tmp_path: Path) -> None:
    """KURA_PEER_SECRET_FILE holds the secret (trimmed); giving both is an error."""
    path = tmp_path / "secret"
    path.write_text(f"  {SECRET}\n")
    environ = {**MESH, "KURA_PEER_SECRET_FILE": str(path)}
    assert parse(environ).replication.auth.secret == SECRET.encode()
    assert "must not be set together" in problems({**environ, "KURA_PEER_SECRET": SECRET})
    assert "cannot be read" in problems({**MESH, "KURA_PEER_SECRET_FILE": str(tmp_path / "no")})


def test_a_next_secret_needs_a_current_one() -> None:
    """Rotation accepts a next secret only alongside the one nodes sign with."""
    assert "KURA_PEER_SECRET_NEXT needs KURA_PEER_SECRET" in problems(
        {"KURA_PEER_SECRET_NEXT": SECRET}
    )


def test_peer_names_need_peer_mtls_and_valid_patterns() -> None:
    """Certificate names only mean something with mTLS; patterns are DNS names."""
    assert "needs peer mTLS" in problems({"KURA_INTERNAL_TLS_PEER_NAMES": "*.kura.svc"})
    assert "not a DNS name pattern" in problems({"KURA_INTERNAL_TLS_PEER_NAMES": "a.*.svc"})


def test_the_unsigned_window_needs_a_secret_and_a_zoned_time() -> None:
    """The rolling-upgrade window is a time with a zone, on a node that signs."""
    assert "needs KURA_PEER_SECRET" in problems(
        {"KURA_PEER_ACCEPT_UNSIGNED_UNTIL": "2026-12-31T00:00:00Z"}
    )
    assert "RFC 3339" in problems(
        {"KURA_PEER_SECRET": SECRET, "KURA_PEER_ACCEPT_UNSIGNED_UNTIL": "2026-12-31 00:00"}
    )


def test_open_mode_is_the_default_and_tokens_leave_it() -> None:
    """No tokens and no extension is open mode; any token turns it off."""
    assert parse({}).open_access
    config = parse({"KURA_AUTH_READ_TOKENS": "r" * 20})
    assert not config.open_access
    assert config.access.tokens[0].scope is Scope.READ


def test_tokens_are_kept_only_as_digests(tmp_path: Path) -> None:
    """Neither the configuration nor its repr holds a token, only SHA-256 digests."""
    token = "super-secret-write-token"
    path = tmp_path / "tokens"
    path.write_text(f"write {token} ci\nread sha256:{'ab' * 32}\n")
    config = parse({"KURA_AUTH_TOKENS_FILE": str(path)})
    write, read = config.access.tokens
    assert write.digest == token_digest(token) and write.name == "ci"
    assert read.digest == bytes.fromhex("ab" * 32)
    assert token not in repr(config)


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ("admin tok-tok-tok-tok-tok\n", "line 1 must be"),
        ("# nothing here\n", "lists no token"),
        ("\nwrite shorty-tok\n", "line 2: a token must have at least 16 characters"),
        ("read bad|tok-tok-tok-tok\n", "may only hold"),
    ],
)
def test_a_bad_token_file_names_the_line_not_the_token(
    tmp_path: Path, content: str, problem: str
) -> None:
    """Token file errors name the line; the token never appears in the message."""
    path = tmp_path / "tokens"
    path.write_text(content)
    message = problems({"KURA_AUTH_TOKENS_FILE": str(path)})
    assert problem in message
    assert "tok-tok" not in message and "shorty" not in message
