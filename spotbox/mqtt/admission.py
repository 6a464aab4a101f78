"""Admission: the --max-pending-logins slots of connections still logging in, shared fairly between addresses.

A connection holds a slot from its admission until it logs in or ends; one that never sends its CONNECT holds
it until its CONNECT deadline. Were the slots first come, first served, one host opening idle sockets would hold
every slot, and every robot arriving meanwhile would wait behind them until refused, no password needed. So:

- An address (as failed logins count it, `auth.source_of`: an IPv6 /64, which one host usually has whole) takes
  a free slot at once while it holds fewer than its share (an eighth, at least MIN_SHARE). Past its share it
  takes one only while more than a quarter of the slots stay free: a busy host (a depot behind one NAT
  reconnecting its fleet) uses most of an idle box's slots, and a quarter always stays for everyone else.
- Connections that must wait queue per address, and freed slots go round the waiting addresses in turn, those
  under their share first: an address's excess waits behind its own connections, never in front of others'.
- At most `max_waiting` connections wait, of which one address at most half.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass, field

# An address's share of the login slots: an eighth, but never fewer than MIN_SHARE (or all there are), so a small
# box's slots are not split into shares of one. Past it, an address leaves a quarter of the slots free for others.
ADMISSION_SHARE = 8
MIN_SHARE = 4
RESERVE_FRACTION = 4


@dataclass(slots=True)
class _Address:
    held: int = 0
    waiting: deque[asyncio.Future[None]] = field(default_factory=deque)


@dataclass(slots=True)
class LoginSlots:
    """`slots` login slots shared between addresses, and at most `max_waiting` connections waiting for one."""

    slots: int
    max_waiting: int
    share: int = field(init=False)
    reserve: int = field(init=False)
    free: int = field(init=False)
    waiting: int = 0
    _addresses: dict[str, _Address] = field(default_factory=dict)
    # Addresses with connections waiting, in the order they are served.
    _turns: deque[str] = field(default_factory=deque)

    def __post_init__(self) -> None:
        self.share = max(self.slots // ADMISSION_SHARE, min(self.slots, MIN_SHARE))
        self.reserve = self.slots // RESERVE_FRACTION
        self.free = self.slots

    def may_wait(self, key: str) -> bool:
        """False when `max_waiting` connections wait already, or half of them are this address's."""
        entry = self._addresses.get(key)
        mine = 0 if entry is None else len(entry.waiting)
        return self.waiting < self.max_waiting and mine < max(1, self.max_waiting // 2)

    def _may_take(self, entry: _Address) -> bool:
        return self.free > 0 and (entry.held < self.share or self.free > self.reserve)

    async def acquire(self, key: str) -> None:
        """Take a slot for a connection from `key`, waiting for its turn if need be (cancel to give up)."""
        entry = self._addresses.get(key)
        if entry is None:
            entry = self._addresses[key] = _Address()
        if not entry.waiting and self._may_take(entry):
            self._take(entry)
            return
        granted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if not entry.waiting:
            self._turns.append(key)
        entry.waiting.append(granted)
        self.waiting += 1
        try:
            await granted
        except BaseException:
            if granted.done() and not granted.cancelled():
                self.release(key)  # given a slot as it was cancelled: hand it on
            else:
                self._withdraw(key, entry, granted)
            raise

    def release(self, key: str) -> None:
        """Free the slot a connection from `key` held (it logged in, or it ended without logging in)."""
        entry = self._addresses[key]
        entry.held -= 1
        self.free += 1
        self._forget_if_idle(key, entry)
        self._serve()

    def _take(self, entry: _Address) -> None:
        entry.held += 1
        self.free -= 1

    def _serve(self) -> None:
        """Give free slots to waiting connections: round the addresses, those under their share first."""
        while self.free > 0 and self._turns:
            key = self._pick()
            if key is None:
                return
            entry = self._addresses[key]
            granted = entry.waiting.popleft()
            self.waiting -= 1
            self._take(entry)
            granted.set_result(None)
            self._turns.remove(key)  # O(waiting addresses); its turn goes to the back if more of it wait
            if entry.waiting:
                self._turns.append(key)

    def _pick(self) -> str | None:
        # Addresses past their share hold at least `share` slots each: at most slots/share of them come first.
        for key in self._turns:
            if self._addresses[key].held < self.share:
                return key
        first = self._turns[0]
        return first if self._may_take(self._addresses[first]) else None

    def _withdraw(self, key: str, entry: _Address, granted: asyncio.Future[None]) -> None:
        entry.waiting.remove(granted)
        self.waiting -= 1
        if not entry.waiting:
            self._turns.remove(key)
        self._forget_if_idle(key, entry)

    def _forget_if_idle(self, key: str, entry: _Address) -> None:
        if entry.held == 0 and not entry.waiting:
            del self._addresses[key]
