"""The SSRF guard against the IANA special-purpose registries: one row per range, with the reason it is refused,
and IPv6 addresses that embed an IPv4 address judged by the embedded address."""

from __future__ import annotations

import ipaddress

import pytest

from pipeline.ingest.fetch import FetchConfig, check_address, embedded_ipv4

# (address inside the range, words the refusal must contain). Registry entries marked "not globally reachable".
REFUSED = [
    ("0.1.2.3", "'this network'"),
    ("10.20.30.40", "private-use"),
    ("100.64.0.1", "shared (CGNAT)"),
    ("127.0.0.1", "loopback"),
    ("169.254.10.10", "link-local"),
    ("172.16.0.5", "private-use"),
    ("192.0.0.1", "IPv4 service continuity prefix"),
    ("192.0.0.8", "IPv4 dummy address"),  # allowed by Python 3.11's is_global
    ("192.0.0.100", "IETF protocol assignment"),  # allowed by Python 3.11's is_global
    ("192.0.0.170", "NAT64/DNS64 discovery"),
    ("192.0.0.171", "NAT64/DNS64 discovery"),
    ("192.0.2.1", "TEST-NET-1"),
    ("192.88.99.1", "deprecated 6to4 relay anycast"),  # allowed by Python 3.11's is_global
    ("192.168.1.1", "private-use"),
    ("198.18.0.1", "benchmarking"),
    ("198.19.255.254", "benchmarking"),
    ("198.51.100.7", "TEST-NET-2"),
    ("203.0.113.9", "TEST-NET-3"),
    ("224.0.0.251", "multicast"),
    ("240.0.0.1", "reserved"),
    ("255.255.255.255", "limited broadcast"),
    ("::", "unspecified"),
    ("::1", "loopback"),
    ("::8.8.8.8", "deprecated IPv4-compatible"),
    ("1::1", "reserved by the IETF"),
    ("64:ff9b:1::8.8.8.8", "local-use IPv4/IPv6 translation"),
    ("100::1", "discard-only"),
    ("100:0:0:1::1", "dummy IPv6 prefix"),  # allowed by Python 3.11's is_global
    ("2001:2::1", "benchmarking"),
    ("2001:10::1", "deprecated ORCHID"),
    ("2001:100::1", "IETF protocol assignment"),
    ("2001:db8::1", "documentation"),
    ("3fff::1", "documentation"),  # allowed by Python 3.11's is_global
    ("5f00::1", "segment routing SIDs"),
    ("fd12:3456::1", "unique-local"),
    ("fe80::1", "link-local"),
    ("fec0::1", "deprecated site-local"),  # allowed by Python 3.11's is_global
    ("ff02::1", "multicast"),
    ("169.254.169.254", "cloud metadata"),
    ("fd00:ec2::254", "cloud metadata"),
    ("100.100.100.200", "cloud metadata"),
]

# IPv6 addresses carrying an IPv4 address: (address, mechanism, embedded address, words of the embedded refusal).
EMBEDDING = [
    ("::ffff:127.0.0.1", "IPv4-mapped", "127.0.0.1", "loopback"),
    ("::ffff:10.0.0.1", "IPv4-mapped", "10.0.0.1", "private-use"),
    ("2002:7f00:1::", "6to4", "127.0.0.1", "loopback"),  # allowed before: Python calls it global
    ("2002:a9fe:a9fe::1", "6to4", "169.254.169.254", "cloud metadata"),
    ("2002:c000:8::", "6to4", "192.0.0.8", "IPv4 dummy address"),
    ("64:ff9b::7f00:1", "NAT64", "127.0.0.1", "loopback"),
    ("64:ff9b::192.168.0.1", "NAT64", "192.168.0.1", "private-use"),
    # Teredo: the client address is stored XOR 0xffffffff (80ff:fffe -> 127.0.0.1)
    ("2001:0:4136:e378:8000:63bf:80ff:fffe", "Teredo client", "127.0.0.1", "loopback"),
    ("2001:0:a00:1:8000:63bf:f7f7:f7f7", "Teredo server", "10.0.0.1", "private-use"),
]

# Globally reachable: the registry's globally reachable exceptions, and embedded public addresses.
ALLOWED = ["93.184.216.34", "8.8.8.8", "2606:4700:4700::1111", "192.0.0.9", "192.0.0.10", "192.31.196.1",
           "192.52.193.1", "192.175.48.1", "::ffff:8.8.8.8", "2002:808:808::1", "64:ff9b::8.8.8.8",
           "2001:0:4136:e378:8000:63bf:f7f7:f7f7"]


@pytest.mark.parametrize("ip,reason", REFUSED, ids=[r[0] for r in REFUSED])
def test_special_purpose_ranges_are_refused_with_their_reason(ip: str, reason: str) -> None:
    why = check_address(ip, FetchConfig())
    assert why is not None and reason in why and str(ipaddress.ip_address(ip)) in why, why


@pytest.mark.parametrize("ip,mechanism,inner,reason", EMBEDDING, ids=[r[0] for r in EMBEDDING])
def test_ipv6_embedding_an_ipv4_address_is_judged_by_it(ip: str, mechanism: str, inner: str, reason: str) -> None:
    addr = ipaddress.ip_address(ip)
    assert (mechanism, ipaddress.ip_address(inner)) in embedded_ipv4(addr)
    why = check_address(ip, FetchConfig())
    assert why is not None and why.startswith(f"{mechanism} address {addr} embeds") and reason in why
    assert why.endswith(f"address {inner}"), why


@pytest.mark.parametrize("ip", ALLOWED)
def test_globally_reachable_addresses_are_allowed(ip: str) -> None:
    assert check_address(ip, FetchConfig()) is None


def test_holes_and_allow_private_apply_through_the_embedded_address() -> None:
    loop = FetchConfig(allowed_networks=("127.0.0.0/8",))
    assert check_address("2002:7f00:1::", loop) is None and check_address("::ffff:127.0.0.1", loop) is None
    assert check_address("2002:a00:1::", loop) is not None  # 10.0.0.1 is not in the hole
    private = FetchConfig(allow_private=True)
    assert check_address("64:ff9b::10.0.0.1", private) is None
    # metadata stays refused, however it is wrapped
    for ip in ("169.254.169.254", "::ffff:169.254.169.254", "2002:a9fe:a9fe::", "64:ff9b::a9fe:a9fe"):
        why = check_address(ip, private)
        assert why is not None and "cloud metadata" in why, ip
