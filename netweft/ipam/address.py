"""Pure address logic: subnets, ranges, gateways, pools and allocation. No I/O."""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network

from netweft.errors import Conflict, InvalidRequest, PoolExhausted


MIN_PREFIX = 8
# Ranges a network of containers can never use: the kernel refuses or misroutes their addresses.
SPECIAL_RANGES = [(IPv4Network("0.0.0.0/8"), "'this network', which cannot be routed"),
                  (IPv4Network("127.0.0.0/8"), "the loopback range"),
                  (IPv4Network("169.254.0.0/16"), "the link-local range"),
                  (IPv4Network("224.0.0.0/4"), "the multicast range"),
                  (IPv4Network("240.0.0.0/4"), "a reserved range (with the broadcast address)")]


def parse_network(text: str, what: str = "subnet") -> IPv4Network:
    try:
        net = ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise InvalidRequest(f"invalid {what} {text!r}: expected an IPv4 CIDR such as 198.18.0.0/24") from None
    if net.version != 4:
        raise InvalidRequest(f"invalid {what} {text!r}: only IPv4 is supported")
    if str(net.network_address) != text.split("/")[0]:
        raise InvalidRequest(f"invalid {what} {text!r}: host bits set, did you mean {net}?")
    if net.prefixlen < MIN_PREFIX:
        raise InvalidRequest(f"invalid {what} {text!r}: a /{net.prefixlen} is larger than any network needs "
                             f"(at most a /{MIN_PREFIX})")
    for special, why in SPECIAL_RANGES:
        if net.overlaps(special):
            raise InvalidRequest(f"invalid {what} {text!r}: it overlaps {special}, {why}; choose a private range "
                                 "such as 10.0.0.0/8, 172.16.0.0/12 or 192.168.0.0/16")
    return net


def parse_address(text: str, what: str = "IP address") -> IPv4Address:
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        raise InvalidRequest(f"invalid {what} {text!r}: expected an IPv4 address such as 198.18.0.5") from None
    if ip.version != 4:
        raise InvalidRequest(f"invalid {what} {text!r}: only IPv4 is supported")
    return ip


def usable_hosts(net: IPv4Network) -> tuple[int, int]:
    """First and last usable host as integers (network and broadcast excluded when they exist)."""
    first, last = int(net.network_address), int(net.broadcast_address)
    if net.prefixlen < 31:
        first, last = first + 1, last - 1
    return first, last


@dataclass(frozen=True)
class SubnetConfig:
    """One network's IPAM configuration (Docker's IPAM.Config entry)."""
    subnet: IPv4Network
    gateway: IPv4Address
    ip_range: IPv4Network | None = None
    aux: dict[str, IPv4Address] = field(default_factory=dict)

    def reserved(self) -> set[IPv4Address]:
        """Addresses never handed to endpoints."""
        return {self.gateway, *self.aux.values()}


def build_subnet_config(subnet: IPv4Network, gateway: str | None = None, ip_range: str | None = None,
                        aux: dict[str, str] | None = None) -> SubnetConfig:
    """Validate gateway, ip-range and aux addresses against the subnet; default gateway is the first host."""
    first, last = usable_hosts(subnet)
    if last - first < 1:
        raise InvalidRequest(f"subnet {subnet} is too small: it needs room for a gateway and at least one container")
    if gateway is None:
        gw = IPv4Address(first)
    else:
        gw = parse_address(gateway, "gateway")
        if not first <= int(gw) <= last:
            raise InvalidRequest(f"gateway {gw} is not a usable address of subnet {subnet}")
    rng = None
    if ip_range is not None:
        rng = parse_network(ip_range, "ip-range")
        if not rng.subnet_of(subnet):
            raise InvalidRequest(f"ip-range {rng} is not inside subnet {subnet}")
    aux_ips: dict[str, IPv4Address] = {}
    for name, text in (aux or {}).items():
        ip = parse_address(text, f"aux-address {name}")
        if ip not in subnet:
            raise InvalidRequest(f"aux-address {name}={ip} is not inside subnet {subnet}")
        aux_ips[name] = ip
    return SubnetConfig(subnet=subnet, gateway=gw, ip_range=rng, aux=aux_ips)


def check_requested_ip(cfg: SubnetConfig, text: str, in_use: set[IPv4Address]) -> IPv4Address:
    """An operator-chosen address: inside the subnet, not reserved, not taken.

    It may lie outside the ip-range, as in Docker: the range bounds what is handed out automatically,
    and operators pin addresses outside it precisely so that they never collide with allocated ones."""
    ip = parse_address(text)
    if ip not in cfg.subnet:
        raise InvalidRequest(f"IP {ip} is not inside the network's subnet {cfg.subnet}")
    first, last = usable_hosts(cfg.subnet)
    if not first <= int(ip) <= last:
        raise InvalidRequest(f"IP {ip} is the network or broadcast address of {cfg.subnet}")
    if ip == cfg.gateway:
        raise Conflict(f"IP {ip} is the network's gateway; choose another address")
    for name, aux_ip in cfg.aux.items():
        if ip == aux_ip:
            raise Conflict(f"IP {ip} is reserved as aux-address {name}; choose another address")
    if ip in in_use:
        raise Conflict(f"IP {ip} is already in use on this network; choose another address")
    return ip


def allocate_ip(cfg: SubnetConfig, in_use: set[IPv4Address]) -> IPv4Address:
    """Lowest free address of the ip-range (or subnet) that is neither reserved nor in use."""
    first, last = usable_hosts(cfg.subnet)
    if cfg.ip_range is not None:
        rf, rl = int(cfg.ip_range.network_address), int(cfg.ip_range.broadcast_address)
        first, last = max(first, rf), min(last, rl)
    taken = {int(a) for a in in_use | cfg.reserved()}
    for n in range(first, last + 1):
        if n not in taken:
            return IPv4Address(n)
    where = f"ip-range {cfg.ip_range}" if cfg.ip_range else f"subnet {cfg.subnet}"
    raise PoolExhausted(f"no free address left in {where}; remove a container or use a larger subnet")


def allocate_ips(cfg: SubnetConfig, in_use: set[IPv4Address], count: int) -> list[IPv4Address]:
    """`count` free addresses in one pass (bulk allocation without rescanning from the start)."""
    first, last = usable_hosts(cfg.subnet)
    if cfg.ip_range is not None:
        first = max(first, int(cfg.ip_range.network_address))
        last = min(last, int(cfg.ip_range.broadcast_address))
    taken = {int(a) for a in in_use | cfg.reserved()}
    out: list[IPv4Address] = []
    n = first
    while len(out) < count:
        if n > last:
            raise PoolExhausted(f"only {len(out)} of {count} addresses are free in {cfg.ip_range or cfg.subnet}")
        if n not in taken:
            out.append(IPv4Address(n))
        n += 1
    return out


def mac_for_ip(ip: IPv4Address) -> str:
    """Deterministic locally administered MAC from the IPv4 address, as Docker does (02:42:a.b.c.d)."""
    return "02:42:" + ":".join(f"{b:02x}" for b in ip.packed)


def parse_mac(text: str) -> str:
    parts = text.lower().split(":")
    if len(parts) != 6 or not all(len(p) == 2 and all(c in "0123456789abcdef" for c in p) for p in parts):
        raise InvalidRequest(f"invalid MAC address {text!r}: expected six hex pairs such as 02:42:c6:12:00:05")
    mac = ":".join(parts)
    # Not a host's address: as a peer's MAC, the zero MAC would become the VXLAN default destination
    # (every host's broadcast flooded to one VTEP), and broadcast or multicast MACs steal flooded traffic.
    if mac == "ff:ff:ff:ff:ff:ff":
        raise InvalidRequest(f"invalid MAC address {text!r}: it is the broadcast address")
    if int(parts[0], 16) & 1:
        raise InvalidRequest(f"invalid MAC address {text!r}: it is a multicast address")
    if mac == "00:00:00:00:00:00":
        raise InvalidRequest(f"invalid MAC address {text!r}: the all-zero address is not a host's address")
    return mac


@dataclass(frozen=True)
class AddressPool:
    """A default address pool: subnets of /size are carved from base."""
    base: IPv4Network
    size: int

    def __str__(self) -> str:
        return f"base={self.base},size={self.size}"


def parse_pool(text: str) -> AddressPool:
    """Parse dockerd's --default-address-pool syntax: base=CIDR,size=N."""
    fields = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        if not sep:
            raise InvalidRequest(f"invalid address pool {text!r}: expected base=CIDR,size=N")
        fields[key.strip()] = value.strip()
    if set(fields) != {"base", "size"}:
        raise InvalidRequest(f"invalid address pool {text!r}: expected base=CIDR,size=N")
    base = parse_network(fields["base"], "address pool base")
    try:
        size = int(fields["size"])
    except ValueError:
        raise InvalidRequest(f"invalid address pool {text!r}: size must be a prefix length") from None
    if not base.prefixlen <= size <= 30:
        raise InvalidRequest(f"invalid address pool {text!r}: size must be between {base.prefixlen} and 30")
    return AddressPool(base, size)


def overlapping(net: IPv4Network, others) -> IPv4Network | None:
    for other in others:
        if net.overlaps(other):
            return other
    return None


def allocate_subnet(pools: list[AddressPool], taken: list[IPv4Network],
                    prefixlen: int | None = None) -> IPv4Network:
    """First subnet of any pool that overlaps nothing taken (other networks, host routes). `prefixlen`: a
    block of that size instead of the pool's (never larger than the pool itself)."""
    for pool in pools:
        size = pool.size if prefixlen is None else max(prefixlen, pool.base.prefixlen)
        # Jump over taken blocks instead of testing every candidate: fast on big pools.
        step = 1 << (32 - size)
        n = int(pool.base.network_address)
        end = int(pool.base.broadcast_address)
        while n + step - 1 <= end:
            cand = IPv4Network((n, size))
            hit = overlapping(cand, taken)
            if hit is None:
                return cand
            n = max(n + step, (int(hit.broadcast_address) + 1 + step - 1) // step * step)
    raise PoolExhausted("the default address pools are exhausted; pass --subnet or give the daemon "
                        "another --default-address-pool")
