"""Traffic shaping (shaping.py) against the simulated internet (testing/fakenet.py): a provider
that refuses a client IP's connections over its cap, or its mail over a rate, with a 421. With
the provider's limits in HOME/shaping.toml MailEngine provokes none of those replies; without
them (the same engine, domains not rolled up) it does. The mail is queued while sending is
paused, then released at once: each domain's MX hosts are looked up before its first unit, so the
provider's limits hold from the first message on."""
from __future__ import annotations

import smtplib

from mailengine import control
from mailengine.testing.engine import RunningEngine, wait_until as wait
from mailengine.testing.fakenet import FakeNet, Provider

from test_delivery import FAST, infs

DOMAINS = ["d0.fake", "d1.fake", "d2.fake"]
PROVIDER = '[provider.bigmail]\nmx = ["bigmail.fake"]\n'


def deliver(tmp_path, rules: str, n: int, **behaviour):
    """n messages over the three domains through a real engine; the provider's counts."""
    p = Provider("bigmail", ["127.0.2.41"], port=0, latency=(0.01, 0.03), **behaviour)
    with FakeNet([p], {d: "bigmail" for d in DOMAINS}) as net:
        tmp_path.mkdir(parents=True, exist_ok=True)
        (tmp_path / "shaping.toml").write_text("builtin = false\n" + rules)
        with RunningEngine(tmp_path, {
                **FAST, "limits.max_connections_per_host": 20, "queue.pause_sending": True,
                "basic.dns_servers": [f"{d},mx1.bigmail.fake,MX,{p.ips[0]}:{p.port}"
                                      for d in DOMAINS]}) as eng:
            with smtplib.SMTP("127.0.0.1", eng.smtp_port, timeout=10) as s:
                for i in range(n):
                    s.sendmail("a@src.test", [f"u{i}@{DOMAINS[i % 3]}"],
                               f"Message-ID: <m{i}@src.test>\r\n\r\nhi\r\n")
            control.request(eng.home / "mailengine.sock", "config.set",
                            name="queue.pause_sending", value=False)  # all of it at once
            wait(lambda: len(infs(eng, "done")) == n, timeout=30, what="delivery")
        return net.stats()["bigmail"]


def test_the_providers_connection_cap_is_kept_across_its_domains(tmp_path):
    st = deliver(tmp_path / "shaped", PROVIDER + "max_connections = 2\n", 24, max_connections=2)
    assert st.refused_connections == 0 and st.peak_connections <= 2
    assert st.deliveries == 24 and st.duplicates == 0
    unshaped = deliver(tmp_path / "not", "", 24, max_connections=2)
    assert unshaped.refused_connections > 0  # each domain its own window: over the cap


def test_the_providers_message_rate_is_kept(tmp_path):
    # 210 a minute: 10 at once, then 3.5 a second, within the provider's 16 a second
    st = deliver(tmp_path / "shaped", PROVIDER + "max_messages_per_minute = 210\n", 24,
                 rate=(16, 1.0))
    assert st.throttled == 0 and st.deliveries == 24 and st.duplicates == 0
    # without the rule the same mail goes faster than the provider allows (a lower rate here,
    # so that a slow, busy machine still shows it)
    unshaped = deliver(tmp_path / "not", "", 24, rate=(6, 1.0))
    assert unshaped.throttled > 0
