"""Command-line options, LINGER_* variables and the TOML config file."""

from __future__ import annotations

from pathlib import Path

import pytest

from linger.cli import build_parser, parse_settings
from linger.config import Settings


def test_defaults_match_the_contract() -> None:
    settings = parse_settings([], environ={})
    assert settings == Settings()
    assert (settings.host, settings.port, settings.max_size, settings.poll_max) == (
        "127.0.0.1",
        8989,
        262144,
        120.0,
    )
    assert settings.db_display == ":memory:"


def test_both_option_spellings(tmp_path: Path) -> None:
    settings = parse_settings(
        ["--port=9000", "--hlm", "5", f"--dbfile={tmp_path}/x.db"], environ={}
    )
    assert settings.port == 9000
    assert settings.hlm == 5
    assert settings.db == f"sqlite+aiosqlite:///{tmp_path}/x.db"


def test_environment_and_config_file(tmp_path: Path) -> None:
    config = tmp_path / "linger.toml"
    config.write_text(
        'port = 7000\nhlm = 3\nmax_size = 100\ndb = "postgresql+asyncpg://u:pw@h/d"\n'
    )
    settings = parse_settings(
        ["--config", str(config), "--hlm", "9"], environ={"LINGER_PORT": "7100"}
    )
    assert settings.port == 7100  # environment over file
    assert settings.hlm == 9  # command line over everything
    assert settings.max_size == 100  # the file
    assert settings.db_display == "postgresql+asyncpg://u:***@h/d"
    env_config = parse_settings([], environ={"LINGER_CONFIG": str(config)})
    assert env_config.port == 7000


def test_flags_take_optional_boolean() -> None:
    assert parse_settings(["--migrate"], environ={}).migrate is True
    assert parse_settings(["--access-log=false"], environ={}).access_log is False
    assert parse_settings([], environ={"LINGER_ACCESS_LOG": "1"}).access_log is True


@pytest.mark.parametrize(
    ("argv", "environ", "fragment"),
    [
        (["--port", "0"], {}, "--port"),
        (["--port", "x"], {}, "--port"),
        (["--hlm", "-1"], {}, "--hlm"),
        (["--max-size", "1e3"], {}, "--max-size"),
        (["--poll-max", "-5"], {}, "--poll-max"),
        (["--log-level", "LOUD"], {}, "--log-level"),
        ([], {"LINGER_HLM": "many"}, "LINGER_HLM"),
        (["--dbfile", "a", "--db", "sqlite+aiosqlite://"], {}, "cannot be used together"),
        (["--no-such-option"], {}, "unrecognized arguments"),
        (["--config", "/nonexistent/linger.toml"], {}, "cannot read config file"),
    ],
)
def test_bad_value_is_one_line_and_exit_2(
    argv: list[str], environ: dict[str, str], fragment: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        parse_settings(argv, environ=environ)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert fragment in err


def test_unknown_config_key_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "c.toml"
    config.write_text("prot = 1\n")
    with pytest.raises(SystemExit):
        parse_settings(["--config", str(config)], environ={})
    assert "unknown key 'prot'" in capsys.readouterr().err


def test_help_documents_every_option_and_variable() -> None:
    text = build_parser().format_help()
    for option in (
        "host",
        "port",
        "dbfile",
        "db",
        "hlm",
        "max-size",
        "poll-max",
        "config",
        "log-level",
        "access-log",
        "migrate",
        "poll-interval",
        "sweep-interval",
        "sqlite-sync",
    ):
        assert f"--{option}" in text
        if option != "config":
            assert "LINGER_" + option.upper().replace("-", "_") in text
