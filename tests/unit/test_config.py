"""Config loading: precedence defaults < file < env < flags, and field-precise errors."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from dcache.address import parse_address
from dcache.config import AuxConfig, HttpConfig, MasterConfig, format_size, load_config, parse_size
from dcache.errors import ConfigError


def test_defaults():
    cfg = load_config(AuxConfig, "aux", {}, env={})
    assert cfg.host == "127.0.0.1" and cfg.port == 7101 and cfg.max_memory == 256 * 1024**2


def test_precedence(tmp_path):
    f = tmp_path / "dcache.toml"
    f.write_text('[aux]\nport = 7200\nmax_memory = "1MB"\nnode_id = "from-file"\nlog-level = "debug"\n')
    env = {"DCACHE_PORT": "7300", "DCACHE_MAX_MEMORY": "2MiB"}
    cfg = load_config(AuxConfig, "aux", {"port": 7400}, env=env, config_file=str(f))
    assert cfg.port == 7400  # flag beats env and file
    assert cfg.max_memory == 2 * 1024**2  # env beats file
    assert cfg.node_id == "from-file"  # file beats default
    assert cfg.log_level == "debug"


@pytest.mark.parametrize(
    "env,field",
    [
        ({"DCACHE_PORT": "70000"}, "port"),
        ({"DCACHE_PORT": "x"}, "DCACHE_PORT"),
        ({"DCACHE_MAX_MEMORY": "lots"}, "DCACHE_MAX_MEMORY"),
        ({"DCACHE_MAX_MEMORY": "0"}, "max_memory"),
        ({"DCACHE_LOG_LEVEL": "loud"}, "log_level"),
        ({"DCACHE_MAX_FRAME_BYTES": "1KB"}, "max_frame_bytes"),
    ],
)
def test_errors_name_the_field(env, field):
    with pytest.raises(ConfigError, match=field):
        load_config(AuxConfig, "aux", {}, env=env)


def test_config_file_errors(tmp_path):
    f = tmp_path / "bad.toml"
    f.write_text("[aux]\nno_such_option = 1\n")
    with pytest.raises(ConfigError, match="no_such_option"):
        load_config(AuxConfig, "aux", {}, env={}, config_file=str(f))
    f.write_text("[aux\n")
    with pytest.raises(ConfigError, match=r"bad\.toml"):
        load_config(AuxConfig, "aux", {}, env={}, config_file=str(f))
    with pytest.raises(ConfigError, match=r"missing\.toml"):
        load_config(AuxConfig, "aux", {}, env={}, config_file=str(tmp_path / "missing.toml"))


def test_config_error_is_a_value_error():
    with pytest.raises(ValueError):
        AuxConfig(port=-1)


@pytest.mark.parametrize(
    "text,expected",
    [("1024", 1024), ("512KB", 512_000), ("512KiB", 524_288), ("256MB", 256_000_000), ("1GiB", 1024**3), ("1.5k", 1500), (7, 7)],
)
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "MB", "-1", "1XB", "1 2"])
def test_parse_size_rejects(text):
    with pytest.raises(ValueError):
        parse_size(text)


def test_parse_address():
    assert parse_address("127.0.0.1:7000") == ("127.0.0.1", 7000)
    assert parse_address("[::1]:7000") == ("::1", 7000)
    assert parse_address("localhost", 7101) == ("localhost", 7101)
    for bad in ("", ":7000", "host:", "host:99999", "a:b:c"):
        with pytest.raises(ValueError):
            parse_address(bad)


def test_zookeeper_settings():
    cfg = load_config(AuxConfig, "aux", {}, env={"DCACHE_ZOOKEEPER": " zk1:2181, zk2:2182/chroot", "DCACHE_CLUSTER": "prod-1"})
    assert cfg.zookeeper == "zk1:2181,zk2:2182/chroot" and cfg.cluster == "prod-1"
    m = load_config(MasterConfig, "master", {}, env={"DCACHE_ZOOKEEPER": "127.0.0.1:2181"})
    assert m.zookeeper == "127.0.0.1:2181" and m.cluster == "dcache" and m.zk_session_timeout == 10.0


@pytest.mark.parametrize(
    ("cls", "section", "env", "field"),
    [
        (AuxConfig, "aux", {"DCACHE_ZOOKEEPER": "zk:2181", "DCACHE_JOIN": "127.0.0.1:7000"}, "zookeeper"),
        (MasterConfig, "master", {"DCACHE_ZOOKEEPER": "zk:2181", "DCACHE_COORDINATOR": "127.0.0.1:7000"}, "zookeeper"),
        (MasterConfig, "master", {"DCACHE_ZOOKEEPER": "zk:2181", "DCACHE_AUX": "a1=127.0.0.1:7101"}, "zookeeper"),
        (MasterConfig, "master", {"DCACHE_ZOOKEEPER": "zk"}, "DCACHE_ZOOKEEPER"),
        (AuxConfig, "aux", {"DCACHE_CLUSTER": "a/b"}, "cluster"),
        (AuxConfig, "aux", {"DCACHE_ZK_SESSION_TIMEOUT": "0"}, "zk_session_timeout"),
    ],
)
def test_zookeeper_settings_rejected(cls, section, env, field):
    with pytest.raises(ConfigError, match=field):
        load_config(cls, section, {}, env=env)


@pytest.mark.parametrize(
    "text,match",
    [
        ('max_memory = "lots"\n', r"'max_memory' is outside a table.*\[aux\], \[master\], \[http\]"),
        ("bogus_key = 1\n[aux]\nport = 7200\n", r"'bogus_key' is outside a table"),
        ("[bogus]\nport = 1\n", r"unknown table \[bogus\]"),
        ("[master]\nmax_memory = 1\n", r"\[master\] has unknown key 'max_memory'"),
        ("[http]\nmasters = '127.0.0.1:7000'\n", r"\[http\] has unknown key 'masters'"),
        ("aux = 1\n", r"aux must be a table"),
        ('[aux]\nmax_memory = "lots"\n', r"\[aux\] max_memory: not a size: 'lots'"),
    ],
)
def test_config_file_layout_is_checked(tmp_path, text, match):
    """Keys outside the role tables, unknown tables and unknown keys in any role's table are refused, naming the file."""
    f = tmp_path / "dcache.toml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=match) as info:
        load_config(AuxConfig, "aux", {}, env={}, config_file=str(f))
    assert str(f) in str(info.value)


def test_one_file_serves_every_role(tmp_path):
    f = tmp_path / "dcache.toml"
    f.write_text('[aux]\nmax_memory = "64MiB"\n[master]\nreplicas = 2\n[http]\nmaster = ["127.0.0.1:7000", "127.0.0.1:7001"]\n')
    assert load_config(AuxConfig, "aux", {}, env={}, config_file=str(f)).max_memory == 64 * 1024**2
    assert load_config(MasterConfig, "master", {}, env={}, config_file=str(f)).replicas == 2
    assert load_config(HttpConfig, "http", {}, env={}, config_file=str(f)).master == ("127.0.0.1:7000", "127.0.0.1:7001")


@pytest.mark.parametrize(
    "n,text", [(256 * 1024**2, "256MiB"), (1024, "1KiB"), (1500, "1500"), (2_000_000, "2MB"), (1024**2 + 4096, "1028KiB")]
)
def test_format_size_round_trips(n, text):
    assert format_size(n) == text and parse_size(text) == n


@pytest.mark.parametrize("parse,text", [(AuxConfig, "x"), (AuxConfig, "7.5")])
def test_integer_fields_say_what_is_wrong(parse, text):
    with pytest.raises(ConfigError, match=rf"DCACHE_PORT: not an integer: '{re.escape(text)}'"):
        load_config(parse, "aux", {}, env={"DCACHE_PORT": text})


def test_the_documented_config_file_loads_for_every_role(tmp_path):
    """docs/OPERATIONS.md's example file is valid for each role it has a table for."""
    doc = (Path(__file__).parents[2] / "docs" / "OPERATIONS.md").read_text()
    [example] = re.findall(r"```toml\n(.*?)```", doc, re.S)
    f = tmp_path / "dcache.toml"
    f.write_text(example)
    ports = {"aux": 7101, "master": 7000, "http": 8080}
    for cls, section in ((AuxConfig, "aux"), (MasterConfig, "master"), (HttpConfig, "http")):
        cfg: Any = load_config(cls, section, {}, env={}, config_file=str(f))
        assert cfg.port == ports[section]
    assert load_config(AuxConfig, "aux", {}, env={}, config_file=str(f)).max_memory == 4 * 1024**3


@pytest.mark.parametrize(
    "cls,section,var",
    [
        (AuxConfig, "aux", "DCACHE_MAX_CLOCK_SKEW"),  # was an OverflowError traceback
        (AuxConfig, "aux", "DCACHE_SNAPSHOT_INTERVAL"),
        (AuxConfig, "aux", "DCACHE_WEIGHT"),
        (MasterConfig, "master", "DCACHE_AUX_TIMEOUT"),
        (HttpConfig, "http", "DCACHE_TIMEOUT"),
    ],
)
@pytest.mark.parametrize("text", ["nan", "inf", "-inf", "1e400"])
def test_seconds_and_weights_must_be_finite(cls, section, var, text):
    with pytest.raises(ConfigError, match=rf"{var}: not a finite number: '{re.escape(text)}'"):
        load_config(cls, section, {}, env={var: text})


@pytest.mark.parametrize("text", ["1000.5", "5000"])
def test_aux_weight_is_bounded_as_join_bounds_it(text):
    """A weight every master refuses in JOIN is refused at start, not retried forever."""
    with pytest.raises(ConfigError, match=r"weight: must be in \(0, 1000\]"):
        load_config(AuxConfig, "aux", {}, env={"DCACHE_WEIGHT": text})
    assert load_config(AuxConfig, "aux", {}, env={"DCACHE_WEIGHT": "1000"}).weight == 1000


@pytest.mark.parametrize("cls,section", [(AuxConfig, "aux"), (MasterConfig, "master")])
@pytest.mark.parametrize(
    "env,needle",
    [
        ({"DCACHE_PORT": "7555", "DCACHE_METRICS_PORT": "7555"}, "metrics_port: port 7555 is --port's too"),
        ({"DCACHE_PORT": "7555", "DCACHE_RESP_PORT": "7555"}, "resp_port: port 7555 is --port's too"),
        ({"DCACHE_METRICS_PORT": "7556", "DCACHE_RESP_PORT": "7556"}, "resp_port: port 7556 is --metrics-port's too"),
    ],
)
def test_one_port_per_listener(cls, section, env, needle):
    """--check-config catches it; the daemon would bind the first and fail on the second."""
    with pytest.raises(ConfigError, match=re.escape(needle)):
        load_config(cls, section, {}, env=env)
    zero = {name: "0" for name in env}  # 0: a free port each
    load_config(cls, section, {}, env=zero)


def test_a_budget_too_small_for_any_entry_is_refused():
    """'--max-memory 128' (the unit forgotten) is 128 bytes: every write would fail with OUT_OF_MEMORY."""
    with pytest.raises(ConfigError, match=r"max_memory: 128 bytes cannot hold a single entry .* a size without a unit is bytes"):
        load_config(AuxConfig, "aux", {}, env={"DCACHE_MAX_MEMORY": "128"})
    assert load_config(AuxConfig, "aux", {}, env={"DCACHE_MAX_MEMORY": "1KiB"}).max_memory == 1024
