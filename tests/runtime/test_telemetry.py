"""Node telemetry: parsers on recorded macOS outputs, Linux sysfs kinds, link probes."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from skulk.core.inputs import InfoObserved, LinkProbed
from skulk.core.telemetry import NetworkInterface, NodeIdentity
from skulk.runtime import telemetry as t

DATA = Path(__file__).parent / "data"


def test_vm_stat_is_parsed_with_its_page_size() -> None:
    page, stats = t.parse_vm_stat((DATA / "vm_stat_mac_studio_m2_ultra.txt").read_text())
    assert page == 16384
    assert stats["pages wired down"] == 812345
    assert stats["anonymous pages"] == 2900478
    assert stats["pages occupied by compressor"] == 401234
    assert stats["translation faults"] == 3928374659
    page, stats = t.parse_vm_stat((DATA / "vm_stat_macbook_intel.txt").read_text())
    assert page == 4096 and stats["swapouts"] == 23948


def test_gpu_wireable_memory_is_total_minus_wired_anonymous_and_compressor() -> None:
    total = int(t.parse_sysctl((DATA / "sysctl_mac_studio.txt").read_text())["hw.memsize"])
    assert total == 192 * 1024**3
    text = (DATA / "vm_stat_mac_studio_m2_ultra.txt").read_text()
    expected = total - (812345 + 2900478 + 401234) * 16384
    assert t.gpu_wireable_bytes(total, text) == expected
    # File-backed cache is reclaimable: far more is wireable than is "free".
    assert expected > 81234 * 16384 * 100
    # Never negative, even when the pages add up to more than an odd total.
    assert t.gpu_wireable_bytes(1024, text) == 0


def test_vm_stat_without_the_needed_lines_is_an_error() -> None:
    with pytest.raises(ValueError, match="page size"):
        t.parse_vm_stat("Pages free: 1.\n")
    with pytest.raises(ValueError, match="lacks"):
        t.gpu_wireable_bytes(1 << 30, "Mach Virtual Memory Statistics: (page size of 4096 bytes)\nPages free: 1.\n")


def test_hardware_ports_map_devices_to_port_names() -> None:
    ports = t.parse_hardware_ports((DATA / "networksetup_mac_studio.txt").read_text())
    assert ports == {
        "en0": "Ethernet",
        "bridge0": "Thunderbolt Bridge",
        "en1": "Wi-Fi",
        "en2": "Thunderbolt 1",
        "en3": "Thunderbolt 2",
        "en5": "iPhone USB",
    }


def test_sysctl_output_is_parsed() -> None:
    got = t.parse_sysctl((DATA / "sysctl_mac_studio.txt").read_text())
    assert got == {"hw.memsize": "206158430208", "machdep.cpu.brand_string": "Apple M2 Ultra", "hw.ncpu": "24"}


def test_macos_interfaces_take_their_kind_from_hardware_ports_and_vpn_from_address() -> None:
    ports = t.parse_hardware_ports((DATA / "networksetup_mac_studio.txt").read_text())
    info = t.network_info(
        addresses={
            "lo0": ["127.0.0.1", "::1"],
            "en0": ["192.168.1.20", "fe80::1%en0"],
            "en1": ["192.168.1.21"],
            "bridge0": ["169.254.33.10"],
            "utun3": ["100.101.102.103", "fd7a:115c:a1e0::5"],
            "en9": ["10.1.2.3"],
        },
        ports=ports,
        platform_name="darwin",
    )
    kinds = {(i.name, i.ip_address): i.kind for i in info.interfaces}
    assert kinds == {
        ("bridge0", "169.254.33.10"): "thunderbolt",
        ("en0", "192.168.1.20"): "ethernet",
        ("en1", "192.168.1.21"): "wifi",
        ("en9", "10.1.2.3"): "unknown",  # an enN without a hardware port says nothing
        ("utun3", "100.101.102.103"): "vpn",
        ("utun3", "fd7a:115c:a1e0::5"): "vpn",
    }, "loopback and link-local addresses are never advertised"


def _sysfs(root: Path) -> Path:
    """A /sys/class/net tree with the files the kind detection reads."""
    net = root / "net"
    for name, arp, device, extra in (
        ("enp3s0", 1, True, None),
        ("wlp2s0", 1, True, "wireless"),
        ("wg0", 65534, False, None),
        ("tun0", 65534, False, "tun_flags"),
        ("tailscale0", 65534, False, "tun_flags"),
        ("br-lab", 1, False, None),
        ("usbnet0", 1, True, None),
    ):
        d = net / name
        d.mkdir(parents=True)
        (d / "type").write_text(f"{arp}\n")
        if device:
            (d / "device").mkdir()
        if extra == "wireless":
            (d / "wireless").mkdir()
        elif extra:
            (d / extra).write_text("0x1001\n")
    return net


def test_linux_kinds_come_from_sysfs(tmp_path: Path) -> None:
    net = _sysfs(tmp_path)
    assert t.linux_interface_kind("enp3s0", net) == "Ethernet"
    assert t.linux_interface_kind("usbnet0", net) == "Ethernet"  # the name says nothing; sysfs does
    assert t.linux_interface_kind("wlp2s0", net) == "Wi-Fi"
    assert t.linux_interface_kind("wg0", net) is None
    assert t.linux_interface_kind("tun0", net) is None
    assert t.linux_interface_kind("br-lab", net) is None
    assert t.linux_interface_kind("missing", net) is None
    info = t.network_info(
        addresses={"usbnet0": ["10.0.0.5"], "wlp2s0": ["10.0.1.5"], "tailscale0": ["100.64.1.2"], "br-lab": ["10.9.0.1"]},
        sysfs_net=net,
        platform_name="linux",
    )
    assert {i.name: i.kind for i in info.interfaces} == {
        "br-lab": "unknown",
        "tailscale0": "vpn",
        "usbnet0": "ethernet",
        "wlp2s0": "wifi",
    }


def test_advertised_addresses_replace_discovery() -> None:
    info = t.network_info([("127.0.0.2", "ethernet"), ("100.64.0.7", None)])
    assert [(i.ip_address, i.kind) for i in info.interfaces] == [("100.64.0.7", "vpn"), ("127.0.0.2", "ethernet")]


def test_a_live_measurement_of_this_host() -> None:
    info = t.gather_info(NodeIdentity(friendly_name="x"), ())
    assert info.memory is not None and info.memory.ram_total.in_bytes > 0
    assert 0 <= info.memory.ram_available.in_bytes <= info.memory.ram_total.in_bytes
    assert info.system is not None and info.system.cpu_count >= 1
    assert info.network is not None
    # A part that fails is left out; the rest is still reported.
    broken = t.gather_info(NodeIdentity(friendly_name="x"), (("not-an-ip", None),))
    assert broken.network is None and broken.memory is not None and broken.identity is not None


async def _serve(body: bytes, status: bytes = b"200 OK", delay_s: float = 0.0) -> tuple[asyncio.Server, int]:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        await asyncio.sleep(delay_s)
        writer.write(b"HTTP/1.1 " + status + b"\r\ncontent-type: application/json\r\ncontent-length: "
                     + str(len(body)).encode() + b"\r\n\r\n" + body)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


def test_probe_reads_the_peer_id_and_fails_cleanly() -> None:
    async def main() -> None:
        ok, port = await _serve(b'"node-b"')
        wrong, wport = await _serve(b"", status=b"404 Not Found")
        slow, sport = await _serve(b'"node-b"', delay_s=5)
        async with ok, wrong, slow:
            assert await t.probe_node_id("127.0.0.1", port, 2.0) == "node-b"
            assert await t.probe_node_id("127.0.0.1", wport, 2.0) is None
            started = asyncio.get_running_loop().time()
            assert await t.probe_node_id("127.0.0.1", sport, 0.3) is None
            assert asyncio.get_running_loop().time() - started < 2.0
            closed = port + 1 if port < 65535 else port - 1
            assert await t.probe_node_id("127.0.0.1", closed if closed not in (wport, sport) else 1, 1.0) is None

    asyncio.run(main())


def test_link_prober_feeds_one_observation_per_advertised_address() -> None:
    async def main() -> None:
        fed: list[object] = []
        server, port = await _serve(b'"peer-1"')
        async with server:
            targets = {
                "peer-1": (port, (NetworkInterface(name="lo", ip_address="127.0.0.1", kind="ethernet"),
                                  NetworkInterface(name="x", ip_address="192.0.2.1", kind="wifi"),
                                  NetworkInterface(name="ll", ip_address="fe80::1", kind="ethernet"))),
                "me": (port, (NetworkInterface(name="lo", ip_address="127.0.0.1", kind="ethernet"),)),
            }
            prober = t.LinkProber(node_id="me", targets=lambda: targets, feed=fed.append, interval_s=10, timeout_s=0.5)
            got = await prober.probe_round()
        assert got == {("peer-1", "127.0.0.1"): True, ("peer-1", "192.0.2.1"): False}
        assert sorted(fed, key=lambda x: x.address) == [  # type: ignore[attr-defined]
            LinkProbed(sink="peer-1", address="127.0.0.1", kind="ethernet", reachable=True),
            LinkProbed(sink="peer-1", address="192.0.2.1", kind="wifi", reachable=False),
        ]
        assert await prober.probe_round(only_new=True) == {}

    asyncio.run(main())


def test_telemetry_feeds_info_observed() -> None:
    async def main() -> None:
        fed: list[object] = []
        tel = t.Telemetry(identity=NodeIdentity(friendly_name="n"), advertise=(), interval_s=1, feed=fed.append)
        info = await tel.measure_once()
        assert isinstance(info, InfoObserved) and fed == [info] and tel.measurements == 1

    asyncio.run(main())
