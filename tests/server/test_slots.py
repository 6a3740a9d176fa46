"""Who slots and connections are shared between: an IPv4 address, or an IPv6 /64 (one host's usual allocation)."""

from __future__ import annotations

from streamload.server.slots import client_key


def test_addresses_of_one_ipv6_64_count_as_one_client_and_ipv4_as_itself() -> None:
    assert client_key("2001:db8:1:2::1") == client_key("2001:db8:1:2:ffff:eeee:dddd:cccc") == "2001:db8:1:2::/64"
    assert client_key("2001:db8:1:3::1") != client_key("2001:db8:1:2::1")
    assert client_key("::ffff:192.0.2.7") == client_key("192.0.2.7") == "192.0.2.7"
    assert client_key("fe80::1%eth0") == "fe80::/64"
    assert client_key(None) is None and client_key("not an address:") == "not an address:"
