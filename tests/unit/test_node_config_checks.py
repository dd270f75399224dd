"""Node configs a daemon cannot run with are refused with one line naming file, key and value."""

from __future__ import annotations

import pytest

from fabricd.config import MetricsConfig, load_node_config
from fabricd.node_checks import check_node_environment
from fabricd.errors import ConfigError

pytestmark = [pytest.mark.unit, pytest.mark.timeout(30)]


def _node(tmp_path, body: str, *, extra: str = "") -> str:
    p = tmp_path / "n.toml"
    p.write_text(f'[node]\nid = "a"\nstate_dir = "{tmp_path / "st"}"\n{body}\n{extra}')
    return str(p)


@pytest.mark.parametrize("body, key, value", [
    ('control = "tcp://"', "node.control", "tcp://"),
    ('control = "tcp://:7700"', "node.control", "tcp://:7700"),
    ('control = "tcp://host"', "node.control", "tcp://host"),
    ('control = "tcp://127.0.0.1:99999"', "node.control", "tcp://127.0.0.1:99999"),
    ('control = "tcp://127.0.0.1:x"', "node.control", "tcp://127.0.0.1:x"),
    ('control = "tcp://no such host!:7700"', "node.control", "tcp://no such host!:7700"),
    ('control = "ipc://"', "node.control", "ipc://"),
    ('advertise_host = "no such host!"', "node.advertise_host", "no such host!"),
    ('advertise_host = "0.0.0.0"', "node.advertise_host", "0.0.0.0"),
    ('advertise_host = "-bad-.example"', "node.advertise_host", "-bad-.example"),
    ("[roles]\nheartbeat_s = 1e-9", "roles.heartbeat_s", 1e-9),
    ("[roles]\nheartbeat_s = 1e9", "roles.heartbeat_s", 1e9),
    ("[roles]\nrestart_backoff_s = 1e-9", "roles.restart_backoff_s", 1e-9),
    ("[cluster]\nretry_period_s = 1e-9", "cluster.retry_period_s", 1e-9),
    ("[metrics]\nport = 65536", "metrics.port", 65536),
    ("[metrics]\nport = -1", "metrics.port", -1),
    ('[metrics]\nport = "9464"', "metrics.port", "9464"),
    ('[metrics]\nbind = "*"', "metrics.bind", "*"),
    ('[metrics]\nbind = "no such host!"', "metrics.bind", "no such host!"),
    ('[metrics]\nenabled = "yes"', "metrics.enabled", "yes"),
    ("[metrics]\npath = 1", "metrics.path", 1),
])
def test_bad_node_values_name_file_key_and_value(tmp_path, body, key, value):
    path = _node(tmp_path, body)
    with pytest.raises(ConfigError) as info:
        load_node_config(path)
    err = info.value
    assert (err.file, err.key, err.value) == (path, key, value)
    assert "\n" not in str(err) and key in str(err)


def test_peer_endpoint_needs_host_and_port(tmp_path):
    path = _node(tmp_path, 'control = "tcp://127.0.0.1:7700"',
                 extra='[[cluster.peers]]\nid = "a"\ncontrol = "tcp://127.0.0.1:7700"\n'
                       '[[cluster.peers]]\nid = "b"\ncontrol = "tcp://:7701"\n')
    with pytest.raises(ConfigError) as info:
        load_node_config(path)
    assert info.value.key == "cluster.peers[1].control"


@pytest.mark.parametrize("control", ["tcp://127.0.0.1:0", "tcp://0.0.0.0:7700", "tcp://*:7700",
                                     "tcp://[::1]:7700", "tcp://node-a.example.com:7700", "ipc:///tmp/x"])
def test_good_endpoints_load(tmp_path, control):
    assert load_node_config(_node(tmp_path, f'control = "{control}"')).control == control


@pytest.mark.parametrize("body, want", [
    ("", MetricsConfig(enabled=True, bind="127.0.0.1", port=9464)),
    ('[metrics]\nbind = "0.0.0.0"\nport = 0', MetricsConfig(enabled=True, bind="0.0.0.0", port=0)),
    ('[metrics]\nbind = "[::1]"', MetricsConfig(bind="::1")),
    ('[metrics]\nbind = "node-a.example.com"\nport = 9100', MetricsConfig(bind="node-a.example.com", port=9100)),
    ("[metrics]\nenabled = false", MetricsConfig(enabled=False)),
])
def test_metrics_table(tmp_path, body, want):
    cfg = load_node_config(_node(tmp_path, "", extra=body))
    assert cfg.metrics == want
    assert cfg.metrics_endpoint_file == cfg.state_dir / "metrics.endpoint"


def test_environment_state_dir_is_a_file(tmp_path):
    (tmp_path / "st").write_text("not a dir")
    cfg = load_node_config(_node(tmp_path, ""))
    with pytest.raises(ConfigError) as info:
        check_node_environment(cfg)
    assert info.value.key == "node.state_dir" and "not a directory" in str(info.value)


def test_environment_state_dir_cannot_be_created(tmp_path):
    p = tmp_path / "n.toml"
    p.write_text('[node]\nid = "a"\nstate_dir = "/proc/fabricd-cannot-exist/st"\n')  # even root cannot mkdir there
    with pytest.raises(ConfigError) as info:
        check_node_environment(load_node_config(p))
    assert info.value.key == "node.state_dir" and "not a writable directory" in str(info.value)


def test_environment_unknown_hosts(tmp_path):
    cfg = load_node_config(_node(tmp_path, 'advertise_host = "fabricd-no-such-host.invalid"'))
    with pytest.raises(ConfigError) as info:
        check_node_environment(cfg)
    assert info.value.key == "node.advertise_host" and "does not resolve" in str(info.value)
    cfg = load_node_config(_node(tmp_path, 'control = "tcp://fabricd-no-such-host.invalid:0"'))
    with pytest.raises(ConfigError) as info:
        check_node_environment(cfg)
    assert info.value.key == "node.control"


def test_environment_address_of_another_machine(tmp_path):
    cfg = load_node_config(_node(tmp_path, 'advertise_host = "192.0.2.1"'))  # TEST-NET-1: never local
    with pytest.raises(ConfigError, match="not an address of this machine"):
        check_node_environment(cfg)


def test_environment_ok(tmp_path):
    check_node_environment(load_node_config(_node(tmp_path, 'control = "tcp://127.0.0.1:0"')))
    assert (tmp_path / "st").is_dir() and list((tmp_path / "st").iterdir()) == []

