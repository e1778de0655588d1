"""Parsing the KURA_EXTENSION_* variables."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

from kura.auth import EXTENSION_VARIABLES, ExtensionConfig
from kura.config import ConfigError


def test_defaults_leave_the_extension_off() -> None:
    """With no variables the extension is disabled and every declared default applies."""
    config = ExtensionConfig.from_environ({})
    assert config == ExtensionConfig()  # whose attribute defaults are the declarations'
    assert not config.enabled
    assert config.auth_fail_closed and config.response_headers_fail_open
    assert not config.jwt_verifiers and not config.http_clients and not config.signers


def test_script_path_enables_even_against_enabled_false(tmp_path: Path) -> None:
    """A script path enables the extension (as upstream), so it cannot be disabled by mistake."""
    script = tmp_path / "policy.py"
    script.write_text("")
    config = ExtensionConfig.from_environ(
        {"KURA_EXTENSION_SCRIPT_PATH": str(script), "KURA_EXTENSION_ENABLED": "false"}
    )
    assert config.enabled
    assert config.script_path == str(script)


@pytest.mark.parametrize("word", ["1", "true", "YES", "on"])
def test_enabled_words_with_a_module(word: str) -> None:
    """KURA_EXTENSION_ENABLED accepts 1/true/yes/on."""
    config = ExtensionConfig.from_environ(
        {"KURA_EXTENSION_ENABLED": word, "KURA_EXTENSION_MODULE": "pkg.policy:Policy"}
    )
    assert config.enabled and config.module == "pkg.policy:Policy"


def test_families_are_parsed_with_case_insensitive_ids() -> None:
    """Verifier, HTTP client and signer groups are keyed by their upper-cased id."""
    key = base64.b64encode(b"raw-key-bytes").decode()
    config = ExtensionConfig.from_environ(
        {
            "KURA_EXTENSION_JWT_VERIFIER_TUIST_SECRET": "s" * 40,
            "KURA_EXTENSION_JWT_VERIFIER_TUIST_ALGORITHM": "hs512",
            "KURA_EXTENSION_JWT_VERIFIER_TUIST_ISSUER": "tuist",
            "KURA_EXTENSION_JWT_VERIFIER_TUIST_AUDIENCES": "kura, cache ,",
            "KURA_EXTENSION_JWT_VERIFIER_my_idp_SECRET": "other",
            "KURA_EXTENSION_HTTP_CLIENT_TUIST_BASE_URL": "https://tuist.dev/",
            "KURA_EXTENSION_HTTP_CLIENT_TUIST_REQUEST_TIMEOUT_MS": "900",
            "KURA_EXTENSION_SIGNER_CACHE_PRIMARY_SECRET": key,
            "KURA_EXTENSION_SIGNER_CACHE_PRIMARY_ALGORITHM": "HMAC_SHA256",
        }
    )
    tuist = config.jwt_verifiers["TUIST"]
    assert (tuist.algorithm, tuist.issuer, tuist.audiences) == ("HS512", "tuist", ("kura", "cache"))
    assert config.jwt_verifiers["MY_IDP"].secret == b"other"
    client = config.http_clients["TUIST"]
    assert (client.base_url, client.connect_timeout_ms, client.request_timeout_ms) == (
        "https://tuist.dev",
        500,
        900,
    )
    assert config.signers["CACHE_PRIMARY"].key == b"raw-key-bytes"
    assert "s" * 40 not in repr(config)


def test_every_bad_variable_is_named_in_one_error(tmp_path: Path) -> None:
    """One ConfigError lists every bad fixed and family variable."""
    with pytest.raises(ConfigError) as caught:
        ExtensionConfig.from_environ(
            {
                "KURA_EXTENSION_SCRIPT_PATH": str(tmp_path / "missing.py"),
                "KURA_EXTENSION_HOOK_TIMEOUT_MS": "0",
                "KURA_EXTENSION_AUTH_CACHE_DENY_TTL_SECONDS": "soon",
                "KURA_EXTENSION_CACHE_MAX_ENTRIES": "0",
                "KURA_EXTENSION_AUTH_FAIL_CLOSED": "maybe",
                "KURA_EXTENSION_JWT_VERIFIER_A_ALGORITHM": "RS256",
                "KURA_EXTENSION_JWT_VERIFIER_B_ISSUER": "x",
                "KURA_EXTENSION_JWT_VERIFIER_C_SECRETS": "typo",
                "KURA_EXTENSION_HTTP_CLIENT_D_BASE_URL": "ftp://x",
                "KURA_EXTENSION_HTTP_CLIENT_E_CONNECT_TIMEOUT_MS": "-5",
                "KURA_EXTENSION_SIGNER_F_SECRET": "not base64!",
                "KURA_EXTENSION_SIGNER_G_ALGORITHM": "hmac-md5",
            }
        )
    message = str(caught.value)
    for name in (
        "KURA_EXTENSION_SCRIPT_PATH",
        "KURA_EXTENSION_HOOK_TIMEOUT_MS",
        "KURA_EXTENSION_AUTH_CACHE_DENY_TTL_SECONDS",
        "KURA_EXTENSION_CACHE_MAX_ENTRIES",
        "KURA_EXTENSION_AUTH_FAIL_CLOSED",
        "KURA_EXTENSION_JWT_VERIFIER_A_ALGORITHM",
        "KURA_EXTENSION_JWT_VERIFIER_B_SECRET",
        "KURA_EXTENSION_JWT_VERIFIER_C_SECRETS",
        "KURA_EXTENSION_HTTP_CLIENT_D_BASE_URL",
        "KURA_EXTENSION_HTTP_CLIENT_E_CONNECT_TIMEOUT_MS",
        "KURA_EXTENSION_HTTP_CLIENT_E_BASE_URL",
        "KURA_EXTENSION_SIGNER_F_SECRET",
        "KURA_EXTENSION_SIGNER_G_ALGORITHM",
    ):
        assert name in message, name
    assert message.count("; ") >= 12


def test_enabled_without_a_source_and_both_sources_are_errors(tmp_path: Path) -> None:
    """Enabling needs a script or a module, and not both."""
    with pytest.raises(ConfigError, match="KURA_EXTENSION_ENABLED needs"):
        ExtensionConfig.from_environ({"KURA_EXTENSION_ENABLED": "on"})
    script = tmp_path / "p.py"
    script.write_text("")
    with pytest.raises(ConfigError, match="KURA_EXTENSION_MODULE cannot be set together"):
        ExtensionConfig.from_environ(
            {"KURA_EXTENSION_SCRIPT_PATH": str(script), "KURA_EXTENSION_MODULE": "a.b"}
        )
    with pytest.raises(ConfigError, match="KURA_EXTENSION_MODULE must look like"):
        ExtensionConfig.from_environ({"KURA_EXTENSION_MODULE": "a b:c"})


def test_every_variable_is_documented() -> None:
    """Each documented variable has a default and a meaning in the extension section."""
    names = [variable.name for variable in EXTENSION_VARIABLES]
    assert len(names) == len(set(names)) == 20
    assert all(v.name.startswith("KURA_EXTENSION_") and v.meaning for v in EXTENSION_VARIABLES)
    assert {v.section for v in EXTENSION_VARIABLES} == {"Authorization extension"}
