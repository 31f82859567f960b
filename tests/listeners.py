"""Which addresses processes listen on: the stack's and the trainers' sockets must stay
on the loopback interface."""

from __future__ import annotations

import ipaddress
import os

import psutil


def listening_addresses(pids: set[int]) -> set[str]:
    return {address for _, address in listeners(pids)}


def listeners(pids: set[int]) -> set[tuple[int, str]]:
    """(pid, address) of every listening TCP socket of `pids`."""
    return {
        (c.pid, c.laddr.ip)
        for c in psutil.net_connections("inet")
        if c.status == psutil.CONN_LISTEN and c.pid in pids
    }


def group_pids(pgid: int) -> set[int]:
    """Live processes of a group (a killed child its parent has not reaped yet is not)."""
    return {
        p.pid
        for p in psutil.process_iter(["status"])
        if _pgid(p.pid) == pgid and p.info["status"] != psutil.STATUS_ZOMBIE
    }


def loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    mapped = getattr(ip, "ipv4_mapped", None)  # ::ffff:127.0.0.1 is the same socket family trick
    return (mapped or ip).is_loopback


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None
