"""Test helpers shared by MailEngine's test suite: real servers on loopback, fixtures, fake clocks.

`dnsserver.TestDNSServer` runs a real DNS server (dnsmasq) on a free loopback port serving zones
given in Python, so resolver and delivery tests never touch the internet.
"""
