"""Tests for pipeproof.impl.settings: defaults, env parsing, field validation, startup validation."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from pipeproof.errors import ConfigError
from pipeproof.impl.settings import (
    DEV_JWT_SECRET,
    Settings,
    delivery_horizon,
    effective_jwt_secret,
    is_placeholder_secret,
    load_settings,
    validate_for_startup,
)

GOOD_SECRET = "k3J9-vQx7!pL2#mZ8@rT5$wY1%nB4^cD6&"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No PIPEPROOF_* variable and no .env leak in from the developer's shell or checkout."""
    import os

    for name in list(os.environ):
        if name.startswith("PIPEPROOF_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_defaults_match_the_protocol() -> None:
    s = load_settings()
    assert s.env == "dev"
    assert s.port == 8765
    assert s.jwt_algorithm == "HS256"
    assert s.jwt_secret is None and s.jwt_audience is None
    assert (s.init_timeout, s.ack_timeout, s.max_attempts) == (3.0, 5.0, 5)
    assert (s.resume_window, s.context_ttl) == (120.0, 1800.0)
    assert (s.max_connections_per_user, s.max_connections_per_account) == (8, 256)
    assert (s.preready_buffer_frames, s.preready_buffer_bytes) == (32, 262_144)
    assert (s.send_queue_max, s.error_budget, s.shutdown_grace) == (256, 10, 10.0)
    assert (s.store_timeout, s.store_pool_size) == (5.0, 10)
    assert s.memory_limit_mb is None
    assert s.heartbeat_interval == 15.0 and s.heartbeat_ms == 15_000
    assert s.disabled_users == []


def test_default_database_and_audit_paths_live_under_data_dir(clean_env: Path) -> None:
    s = load_settings(data_dir=Path("state"))
    expected_db = (clean_env / "state" / "pipeproof.db").resolve()
    assert s.resolved_database_url() == f"sqlite+aiosqlite:///{expected_db}"
    assert s.resolved_audit_log() == Path("state") / "audit.jsonl"
    assert load_settings(audit_log="stdout").resolved_audit_log() == "stdout"
    assert load_settings(audit_log="OFF").resolved_audit_log() == "off"
    assert load_settings(audit_log="/var/log/pp.jsonl").resolved_audit_log() == Path("/var/log/pp.jsonl")
    url = "postgresql+asyncpg://pp@db:5432/pp"
    assert load_settings(database_url=url).resolved_database_url() == url


def test_environment_variables_are_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PIPEPROOF_ENV", "test")
    monkeypatch.setenv("PIPEPROOF_PORT", "9000")
    monkeypatch.setenv("PIPEPROOF_ACK_TIMEOUT", "0.25")
    monkeypatch.setenv("PIPEPROOF_HEARTBEAT_INTERVAL", "0.5")
    monkeypatch.setenv("PIPEPROOF_MEMORY_LIMIT_MB", "512")
    s = load_settings()
    assert (s.env, s.port, s.ack_timeout, s.memory_limit_mb) == ("test", 9000, 0.25, 512.0)
    assert s.heartbeat_ms == 500


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ('["alice", "bob"]', ["alice", "bob"]),
        ("alice, bob ,carol", ["alice", "bob", "carol"]),
        ("", []),
    ],
)
def test_disabled_users_accepts_json_or_commas(
    monkeypatch: pytest.MonkeyPatch, raw: str, expected: list[str]
) -> None:
    monkeypatch.setenv("PIPEPROOF_DISABLED_USERS", raw)
    assert load_settings().disabled_users == expected


def test_dotenv_file_is_read(clean_env: Path) -> None:
    (clean_env / ".env").write_text("PIPEPROOF_MAX_ATTEMPTS=7\nPIPEPROOF_JWT_AUDIENCE=pp\n")
    s = load_settings()
    assert s.max_attempts == 7
    assert s.jwt_audience == "pp"


@pytest.mark.parametrize(
    ("field", "value", "setting"),
    [
        ("ack_timeout", 0, "PIPEPROOF_ACK_TIMEOUT"),
        ("init_timeout", -1.0, "PIPEPROOF_INIT_TIMEOUT"),
        ("resume_window", 0.0, "PIPEPROOF_RESUME_WINDOW"),
        ("context_ttl", -5, "PIPEPROOF_CONTEXT_TTL"),
        ("heartbeat_interval", 0, "PIPEPROOF_HEARTBEAT_INTERVAL"),
        ("store_timeout", 0, "PIPEPROOF_STORE_TIMEOUT"),
        ("max_attempts", 0, "PIPEPROOF_MAX_ATTEMPTS"),
        ("store_pool_size", 0, "PIPEPROOF_STORE_POOL_SIZE"),
        ("preready_buffer_frames", 0, "PIPEPROOF_PREREADY_BUFFER_FRAMES"),
        ("error_budget", 0, "PIPEPROOF_ERROR_BUDGET"),
        ("memory_limit_mb", 0, "PIPEPROOF_MEMORY_LIMIT_MB"),
        ("port", 70000, "PIPEPROOF_PORT"),
        ("env", "staging", "PIPEPROOF_ENV"),
        ("jwt_algorithm", "none", "PIPEPROOF_JWT_ALGORITHM"),
    ],
)
def test_invalid_fields_raise_config_error_naming_the_variable(
    field: str, value: object, setting: str
) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(**{field: value})
    assert info.value.setting == setting
    assert setting in str(info.value)


def test_bad_database_scheme_is_rejected_without_echoing_the_url() -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(database_url="mysql://root:hunter2@db/pp")
    assert info.value.setting == "PIPEPROOF_DATABASE_URL"
    assert "hunter2" not in str(info.value)


def test_per_user_limit_cannot_exceed_per_account_limit() -> None:
    with pytest.raises(ConfigError):
        load_settings(max_connections_per_user=10, max_connections_per_account=5)


# -- startup validation ---------------------------------------------------------------------------


def test_prod_requires_a_secret() -> None:
    with pytest.raises(ConfigError) as info:
        validate_for_startup(load_settings(env="prod"))
    assert info.value.setting == "PIPEPROOF_JWT_SECRET"
    with pytest.raises(ConfigError):
        effective_jwt_secret(load_settings(env="prod"))


def test_prod_rejects_a_short_secret() -> None:
    short = "Zq8#vL2!pX9@"  # random-looking but 12 bytes
    with pytest.raises(ConfigError) as info:
        validate_for_startup(load_settings(env="prod", jwt_secret=short))
    assert info.value.setting == "PIPEPROOF_JWT_SECRET"
    assert "32" in info.value.detail
    assert short not in str(info.value)


@pytest.mark.parametrize(
    "secret",
    [
        "changeme",
        "CHANGEME",
        "secret",
        "placeholder",
        "dev-secret",
        "test-secret",
        "your-secret-here",
        "xxx",
        "XXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXX",
        "change-this-before-going-live-0123456789",
        "Changeit-9f8e7d6c5b4a39281706f5e4d3c2b1a0",
        "please-replace-this-placeholder-1234567890",
        "abababababababababababababababababab",
        DEV_JWT_SECRET,
    ],
)
def test_prod_rejects_placeholders(secret: str) -> None:
    assert is_placeholder_secret(secret)
    with pytest.raises(ConfigError) as info:
        validate_for_startup(load_settings(env="prod", jwt_secret=secret))
    assert info.value.setting == "PIPEPROOF_JWT_SECRET"


def test_prod_accepts_a_real_secret() -> None:
    assert not is_placeholder_secret(GOOD_SECRET)
    s = load_settings(env="prod", jwt_secret=GOOD_SECRET)
    validate_for_startup(s)
    assert effective_jwt_secret(s) == GOOD_SECRET


@pytest.mark.parametrize("env", ["dev", "test"])
def test_dev_and_test_fall_back_to_the_documented_dev_secret(env: str) -> None:
    s = load_settings(env=env)
    validate_for_startup(s)
    assert effective_jwt_secret(s) == DEV_JWT_SECRET
    assert len(DEV_JWT_SECRET.encode()) >= 32
    # An explicit secret wins even when it would be unacceptable in prod.
    assert effective_jwt_secret(load_settings(env=env, jwt_secret="changeme")) == "changeme"


def _rsa_pems() -> tuple[str, str]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    public = (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    return private, public


@pytest.mark.parametrize("env", ["prod", "dev"])
def test_rs256_requires_a_public_key(env: str) -> None:
    with pytest.raises(ConfigError) as info:
        validate_for_startup(load_settings(env=env, jwt_algorithm="RS256"))
    assert info.value.setting == "PIPEPROOF_JWT_PUBLIC_KEY"


def test_rs256_keys_must_parse() -> None:
    private, public = _rsa_pems()
    validate_for_startup(
        load_settings(env="prod", jwt_algorithm="RS256", jwt_public_key=public, jwt_private_key=private)
    )
    with pytest.raises(ConfigError) as info:
        validate_for_startup(load_settings(env="prod", jwt_algorithm="RS256", jwt_public_key="not a pem"))
    assert info.value.setting == "PIPEPROOF_JWT_PUBLIC_KEY"
    with pytest.raises(ConfigError) as info:
        validate_for_startup(
            load_settings(env="prod", jwt_algorithm="RS256", jwt_public_key=public, jwt_private_key=public)
        )
    assert info.value.setting == "PIPEPROOF_JWT_PRIVATE_KEY"
    assert "BEGIN" not in str(info.value)


def test_settings_are_immutable() -> None:
    s = Settings(_env_file=None)  # type: ignore[call-arg]
    with pytest.raises(ValueError):
        s.port = 1


# -- startup refuses what would fail later (hardening item 7) ------------------------------------


def test_an_infinite_duration_is_refused() -> None:
    with pytest.raises(ConfigError, match="PIPEPROOF_ACK_TIMEOUT"):
        load_settings(ack_timeout=float("inf"))


def test_a_context_ttl_below_the_delivery_horizon_is_refused() -> None:
    settings = load_settings(context_ttl=60.0)  # the default horizon is about 270 s
    assert delivery_horizon(settings) > 60.0
    with pytest.raises(ConfigError, match="PIPEPROOF_CONTEXT_TTL"):
        validate_for_startup(settings)
    validate_for_startup(load_settings(context_ttl=600.0))


def test_a_misspelt_variable_is_a_warning_in_dev_and_an_error_in_prod(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("PIPEPROOF_ACK_TIMOUT", "1")
    monkeypatch.setenv("PIPEPROOF_TEST_SOMETHING", "harness variables are not settings")
    with caplog.at_level("WARNING", logger="pipeproof.settings"):
        load_settings()
    assert "PIPEPROOF_ACK_TIMOUT" in caplog.text and "PIPEPROOF_TEST_SOMETHING" not in caplog.text
    with pytest.raises(ConfigError, match="PIPEPROOF_ACK_TIMOUT"):
        load_settings(env="prod")


@pytest.mark.parametrize("case", ["data dir is a file", "data dir under /proc", "audit log unwritable"])
def test_serve_refuses_unusable_paths_with_exit_2_before_the_banner(tmp_path: Path, case: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIPEPROOF_")}
    if case == "data dir is a file":
        (tmp_path / "file").write_text("not a directory")
        env["PIPEPROOF_DATA_DIR"] = str(tmp_path / "file")
        setting = "PIPEPROOF_DATA_DIR"
    elif case == "data dir under /proc":
        env["PIPEPROOF_DATA_DIR"] = "/proc/pipeproof-data"
        setting = "PIPEPROOF_DATA_DIR"
    else:
        env["PIPEPROOF_DATA_DIR"] = str(tmp_path / "data")
        env["PIPEPROOF_AUDIT_LOG"] = "/proc/pipeproof/audit.jsonl"
        setting = "PIPEPROOF_AUDIT_LOG"
    proc = subprocess.run([sys.executable, "-m", "pipeproof.cli", "serve", "--port", "0"], env=env,
                          capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert setting in proc.stderr and "Traceback" not in proc.stdout + proc.stderr
    assert "listening on" not in proc.stdout


def test_each_process_gets_a_fresh_node_id_unless_one_is_set(monkeypatch: pytest.MonkeyPatch) -> None:
    # Section 6: the run leases name the node; a random id per process start by default.
    first, second = load_settings(), load_settings()
    assert first.node_id != second.node_id and len(first.node_id) == 32
    monkeypatch.setenv("PIPEPROOF_NODE_ID", "node-a")
    assert load_settings().node_id == "node-a"
    for bad in ("", "   ", "a\x00b", "x" * 129):
        with pytest.raises(ConfigError, match="PIPEPROOF_NODE_ID"):
            load_settings(node_id=bad)


def test_the_lease_is_renewed_every_third_of_its_ttl_by_default_and_must_be_renewed_within_it() -> None:
    s = load_settings()
    assert (s.run_lease_ttl, s.lease_renew_interval) == (10.0, pytest.approx(10.0 / 3))
    assert load_settings(run_lease_ttl=3.0).lease_renew_interval == pytest.approx(1.0)
    assert load_settings(run_lease_renew_interval=2.0).lease_renew_interval == 2.0
    validate_for_startup(load_settings(run_lease_ttl=2.0, run_lease_renew_interval=1.9))
    for renew in (2.0, 5.0):
        with pytest.raises(ConfigError, match="PIPEPROOF_RUN_LEASE_RENEW_INTERVAL"):
            validate_for_startup(load_settings(run_lease_ttl=2.0, run_lease_renew_interval=renew))
    with pytest.raises(ConfigError, match="PIPEPROOF_RUN_LEASE_TTL"):
        load_settings(run_lease_ttl=0)


def test_on_postgresql_the_cluster_poll_must_be_quicker_than_the_ack_wait() -> None:
    pg = "postgresql+asyncpg://u@127.0.0.1/db"
    assert (load_settings().cluster_poll_interval, load_settings().cluster_notify) == (1.0, True)
    validate_for_startup(load_settings(database_url=pg, ack_timeout=5.0, cluster_poll_interval=4.9))
    for poll in (5.0, 30.0):
        with pytest.raises(ConfigError, match="PIPEPROOF_CLUSTER_POLL_INTERVAL"):
            validate_for_startup(load_settings(database_url=pg, ack_timeout=5.0, cluster_poll_interval=poll))
    # One node on SQLite polls nothing: any interval starts.
    validate_for_startup(load_settings(ack_timeout=0.5, cluster_poll_interval=30.0))
    with pytest.raises(ConfigError, match="PIPEPROOF_CLUSTER_POLL_INTERVAL"):
        load_settings(cluster_poll_interval=0)
