"""Test helpers shared by MailEngine's test suite: real servers on loopback, fixtures, fake clocks.

`dnsserver.TestDNSServer` runs a real DNS server (dnsmasq) on a free loopback port serving zones
given in Python, so resolver and delivery tests never touch the internet. `sink.SMTPSink` is a scriptable SMTP
server; `fakenet.FakeNet` a simulated internet of mailbox providers (latency, connection caps and
message rates per client IP, greylisting, unknown users, a tarpit) for bench/fakenet.py and the
tests of traffic shaping.
"""
