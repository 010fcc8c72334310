"""Settings: every SPEC 3 key with its default, a commented default file, clear validation errors."""
import os
import tomllib

import pytest

from mailengine import config
from mailengine.config import AddressSet, ConfigError, from_dict

SPEC_DEFAULTS = {
    "basic.nameservers": [], "basic.dns_servers": [], "basic.preload_domains": [],
    "basic.local_domains": [], "basic.admin_email": "", "network.helo_text": "",
    "network.smtp_listen_ips": [], "network.smtp_port": 25, "network.smtp_source_ip": "",
    "network.web_ip": "127.0.0.1",  # the manual: "" (any); issue 16: this machine only
    "network.web_port": 81, "policy.rcpt_relay_domains": [],
    "policy.relay_ips": ["127.0.0.1"], "policy.refused_mail_from": [],
    "policy.refused_mail_servers": [], "queue.dsn": False, "queue.queue_check_interval": 600,
    "queue.pause_sending": False, "queue.relay_via_disk": True, "queue.save_done": False,
    "queue.done_retention_minutes": 60, "queue.save_incoming": False,
    "queue.incoming_retention_minutes": 60, "queue.retry_intervals": [30, 120, 240, 480, 960],
    "logging.bounce_host": "", "logging.log_retention_days": 10, "logging.log_undeliverable": True,
    "logging.stats_interval": 10, "limits.smtp_receive_timeout": 600,
    "limits.smtp_connect_timeout": 240, "limits.smtp_write_timeout": 240,
    "limits.smtp_body_timeout": 600, "limits.smtp_read_timeout": 240,
    "limits.max_connections_per_host": 10,
    "limits.messages_in_memory": 20000,  # the manual: 500000; issue 12: Postfix's active limit
    "limits.max_send_rate": 0, "limits.inbound_priority_ips": [],
    "limits.max_message_size": 10485760, "limits.max_outbound_connections": 500,
    "limits.max_queue_memory_kb": 2000000, "limits.max_bandwidth": 0,
    "limits.max_inbound_connections": 1000, "debug.dns": False, "debug.smtp_out": False,
    "debug.smtp_in": False, "debug.program": False, "debug.send_loop": False,
    "debug.queue_size": True, "debug.queue_memory": True, "reports.delivery_reports": "",
    "reports.recipients": [], "reports.domains": [],
}


def test_every_spec_key_has_its_default(tmp_path):
    cfg = config.load(tmp_path / "home")
    for name, default in SPEC_DEFAULTS.items():
        assert cfg.get(name) == default, name


def test_missing_home_gets_a_commented_file_with_every_setting(tmp_path):
    home = tmp_path / "new"
    config.load(home)
    text = (home / "mailengine.toml").read_text()
    data = tomllib.loads(text)
    for name, default in SPEC_DEFAULTS.items():
        sec, key = name.split(".")
        assert data[sec][key] == default, name
    assert "# Write relayed mail to disk" in text  # documentation travels with the value


def test_attribute_access_and_set(tmp_path):
    cfg = config.load(tmp_path)
    assert cfg.queue.relay_via_disk is True
    cfg.set("network.smtp_port", 2525)
    assert cfg.network.smtp_port == 2525


@pytest.mark.parametrize("toml, fragment", [
    ("[network]\nsmtp_port = 0", "network.smtp_port = 0: must be at least 1"),
    ("[network]\nsmtp_port = \"x\"", "must be a number"),
    ("[limits]\nmax_message_size = 100", "must be at least 1024 (or 0)"),
    ("[limits]\nsmtp_receive_timeout = 2", "must be at least 5"),
    ("[queue]\nrelay_via_disk = 1", "must be true or false"),
    ("[policy]\nrelay_ips = [\"10.0.0.300\"]", "not an IP address"),
    ("[policy]\nrcpt_relay_domains = [\"example.com\"]", "must look like '@example.com'"),
    ("[basic]\ndns_servers = [\"a.com,mx.a.com,XX,1.2.3.4\"]", "domain,hostname,MX|NS,ip"),
    ("[reports]\ndelivery_reports = \"q\"", "must be one of"),
    ("[queue]\nretry_intervals = [-1]", "may not be negative"),
])
def test_bad_values_name_key_value_and_rule(tmp_path, toml, fragment):
    (tmp_path / "mailengine.toml").write_text(toml)
    with pytest.raises(ConfigError) as e:
        config.load(tmp_path)
    assert fragment in str(e.value)


def test_zero_message_size_means_no_limit_and_is_allowed(tmp_path):
    (tmp_path / "mailengine.toml").write_text("[limits]\nmax_message_size = 0\n")
    assert config.load(tmp_path).limits.max_message_size == 0


def test_unknown_keys_stop_the_load_with_the_nearest_setting_and_bad_toml_is_clear(tmp_path):
    (tmp_path / "mailengine.toml").write_text("[queue]\nno_such = 1\n")
    with pytest.raises(ConfigError, match="queue.no_such: no such setting"):
        config.load(tmp_path)
    (tmp_path / "mailengine.toml").write_text("[network]\nsmtp_prot = 3326\n")
    with pytest.raises(ConfigError, match=r"network.smtp_prot: no such setting "
                                          r"\(did you mean network.smtp_port\?\)"):
        config.load(tmp_path)
    (tmp_path / "mailengine.toml").write_text("[netwrok]\nsmtp_port = 2525\n")
    with pytest.raises(ConfigError, match=r"\[netwrok\]: no such section \(did you mean "
                                          r"\[network\]\?\)"):
        config.load(tmp_path)
    (tmp_path / "mailengine.toml").write_text("[basic]\nsmtp_port = 2525\n")
    with pytest.raises(ConfigError, match=r"did you mean network.smtp_port\?"):
        config.load(tmp_path)
    # config upgrade reads files of older releases: there they are reported, not refused.
    assert config.load(tmp_path, strict=False).warnings == [
        "basic.smtp_port: no such setting (did you mean network.smtp_port?); ignored"]
    (tmp_path / "mailengine.toml").write_text("[queue\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        config.load(tmp_path)


def test_obsolete_max_threads_still_loads_with_a_warning(tmp_path):
    """Issue 15.9: nothing read limits.max_threads; an old file that has it loads, and says so."""
    (tmp_path / "mailengine.toml").write_text("[limits]\nmax_threads = 500\n")
    cfg = config.load(tmp_path)
    warning, = [w for w in cfg.warnings if "max_threads" in w]
    assert warning.startswith("limits.max_threads: obsolete, ignored (")
    assert "limits.max_threads" not in cfg.values
    assert "max_threads" not in config.default_toml()


def test_check_interval_longer_than_retry_warns(tmp_path):
    (tmp_path / "mailengine.toml").write_text(
        "[queue]\nretry_intervals = [1]\nqueue_check_interval = 600\n")
    assert any("queue_check_interval" in w for w in config.load(tmp_path).warnings)


def test_address_sets_ranges_cidr_ipv6_and_everyone():
    s = AddressSet(["127.0.0.1", "10.0.0.5-10.0.0.9", "192.168.1.0/24", "::1"])
    assert "127.0.0.1" in s and "10.0.0.7" in s and "192.168.1.200" in s and "::1" in s
    assert "::ffff:127.0.0.1" in s  # IPv4-mapped IPv6 peer
    assert "10.0.0.10" not in s and "127.0.0.2" not in s and "::2" not in s
    assert "not-an-ip" not in s
    assert "8.8.8.8" in AddressSet(["0"])


def test_relay_ips_zero_written_as_number(tmp_path):
    (tmp_path / "mailengine.toml").write_text("[policy]\nrelay_ips = 0\n")
    assert config.load(tmp_path).policy.relay_ips == ["0"]


@pytest.mark.parametrize("cores,processes", [(1, 1), (2, 2), (7, 2), (8, 2), (16, 4), (64, 16)])
def test_delivery_processes_by_default_one_per_four_cores_at_least_two(tmp_path, monkeypatch,
                                                                       cores, processes):
    monkeypatch.setattr(os, "cpu_count", lambda: cores)
    assert from_dict(tmp_path, {}).delivery_process_count == processes
    assert from_dict(tmp_path, {"network": {"delivery_processes": 1}}).delivery_process_count == 1
