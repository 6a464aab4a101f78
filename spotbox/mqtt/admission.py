"""Admission: the --max-pending-logins slots of connections still logging in, shared fairly between addresses.

A connection holds a slot from its admission until it logs in or ends; one that never sends its CONNECT holds
it until its CONNECT deadline. Without a share per address, one host opening idle sockets would hold every slot,
and every robot arriving meanwhile would wait in line behind them until refused (no password needed to do it).
So each address (an IPv6 /64, which one host usually has whole) may hold at most a share of the slots, and a
connection past its address's share waits for one of its own address's slots before it queues for a slot at
all: an address's excess waits behind its own connections, never in front of others'.
"""

from __future__ import annotations

import asyncio
import ipaddress
from dataclasses import dataclass, field

# An address holds at most 1/ADMISSION_SHARE of the login slots, and of the connections allowed to wait for one,
# but never fewer than MIN_SHARE (or all there are): a small box's limits are not split into shares of one.
ADMISSION_SHARE = 8
MIN_SHARE = 4


def address_key(address: str) -> str:
    """What one client host is, for its share: the address itself, or its /64 for IPv6."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return address


def _share(total: int) -> int:
    return max(total // ADMISSION_SHARE, min(total, MIN_SHARE))


@dataclass(slots=True)
class _Address:
    slots: asyncio.Semaphore
    # Connections of this address that hold or wait for one of its slots.
    users: int = 0


@dataclass(slots=True)
class LoginSlots:
    """`slots` login slots; each address at most `per_address` of them, at most `max_waiting` waiting."""

    slots: int
    max_waiting: int
    per_address: int = field(init=False)
    max_waiting_per_address: int = field(init=False)
    waiting: int = 0
    _global: asyncio.Semaphore = field(init=False)
    _addresses: dict[str, _Address] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.per_address = _share(self.slots)
        self.max_waiting_per_address = _share(self.max_waiting)
        self._global = asyncio.Semaphore(self.slots)

    def may_wait(self, key: str) -> bool:
        """False when `max_waiting` connections wait already, or this address's share of them."""
        entry = self._addresses.get(key)
        queued = 0 if entry is None else entry.users
        return self.waiting < self.max_waiting and queued < self.max_waiting_per_address + self.per_address

    async def acquire(self, key: str) -> None:
        """Take a slot for a connection from `key`: one of its address's, then one of all (cancel to give up)."""
        entry = self._addresses.get(key)
        if entry is None:
            entry = self._addresses[key] = _Address(asyncio.Semaphore(self.per_address))
        entry.users += 1
        self.waiting += 1
        try:
            await entry.slots.acquire()
            try:
                await self._global.acquire()
            except BaseException:
                entry.slots.release()
                raise
        except BaseException:
            self._forget(key, entry)
            raise
        finally:
            self.waiting -= 1

    def release(self, key: str) -> None:
        """Free the slot a connection from `key` held (it logged in, or it ended without logging in)."""
        entry = self._addresses[key]
        self._global.release()
        entry.slots.release()
        self._forget(key, entry)

    def _forget(self, key: str, entry: _Address) -> None:
        entry.users -= 1
        if entry.users == 0:
            del self._addresses[key]
