"""Who may connect and what each user may use: logins (users file, argon2) and topic grants.

Without a users file only anonymous clients on loopback are accepted (SPEC 7). With one, a password check is an
argon2 hash, tens of milliseconds of CPU by design, so (issue 11 item 5, issue 12):
- a robot that already proved its password reconnects in microseconds: verified (user, password) pairs are
  remembered as an HMAC under a per-process random key, never as the password, and forgotten when the file changes;
- failed logins slow down their source address before any hash is computed (0.1 s doubling up to 5 s, forgotten
  after a success or a quiet minute), and attempts from a penalised address are spaced by that delay;
- at most `max_hashing` hashes run at once, in their own threads; waiting attempts are served address by address
  in turn, so a flood from one address does not delay the others, and past `max_per_source` waiting attempts
  from one address or `max_waiting` in all, an attempt is refused at once as busy instead of piling up.
Penalties are per address, never per user: someone else's failures never lock a right password out.
"""

from __future__ import annotations

import asyncio
import enum
import hashlib
import hmac
import ipaddress
import logging
import os
import time
from collections import deque
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from spotbox.errors import ConfigError
from spotbox.mqtt.topics import parse_shared
from spotbox.users import User, Users

logger = logging.getLogger(__name__)


class Outcome(enum.Enum):
    """How a login ended."""

    OK = "ok"
    BAD_CREDENTIALS = "bad_credentials"
    NOT_AUTHORIZED = "not_authorized"
    BUSY = "busy"  # refused before any check: too many logins waiting; the client should retry later


# CONNACK return codes (MQTT 3.1.1, 3.2.2.3) and reason codes (MQTT 5, 3.2.2.2) of each outcome. In 3.1.1 a
# wrong password is 5 "not authorized", as Mosquitto answers and spotbox always has: 3.1.1's 4 reads "the data
# in the user name or password is malformed"; MQTT 5's 0x86 is "not accepted", so there it is 0x86.
_CODES_311 = {Outcome.OK: 0, Outcome.BAD_CREDENTIALS: 5, Outcome.NOT_AUTHORIZED: 5, Outcome.BUSY: 3}
_CODES_5 = {Outcome.OK: 0x00, Outcome.BAD_CREDENTIALS: 0x86, Outcome.NOT_AUTHORIZED: 0x87, Outcome.BUSY: 0x89}


@dataclass(frozen=True, slots=True)
class LoginResult:
    """The answer to a login: the outcome, the user name when it is a user's login, and why (for the log)."""

    outcome: Outcome
    user: str | None = None
    reason: str = ""

    @property
    def ok(self) -> bool:
        """True when the client may connect."""
        return self.outcome is Outcome.OK

    @property
    def code311(self) -> int:
        """The MQTT 3.1.1 CONNACK return code (0 accepted, 3 server unavailable, 5 not authorized)."""
        return _CODES_311[self.outcome]

    @property
    def code5(self) -> int:
        """The MQTT 5 CONNACK reason code (0x00, 0x86 bad user name or password, 0x87 not authorized, 0x89 busy)."""
        return _CODES_5[self.outcome]


@dataclass(slots=True)
class _Penalty:
    """The failed logins of one source address."""

    failures: int
    last_failure: float
    next_at: float  # the earliest time the next attempt from this address is checked
    waiting: int = 0


def from_loopback(address: str) -> bool:
    """True when `address` (an IP address, as a listener reports its peer) is this machine."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False  # "" when the WebSocket listener cannot tell the peer: refused
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # a dual-stack listener reports 127.0.0.1 as ::ffff:127.0.0.1
    return ip.is_loopback


def source_of(address: str) -> str:
    """The unit failed logins are counted by: the IPv4 address, or the IPv6 /64 (one host's usual share)."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


class Authenticator:
    """Logins and grants for the MQTT listeners; `clock` and `sleep` are injectable so tests never really wait."""

    def __init__(
        self,
        users: Users | None,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        max_hashing: int = 2,
        max_per_source: int = 32,
        max_waiting: int = 512,
        base_delay: float = 0.1,
        max_delay: float = 5.0,
        quiet: float = 60.0,
        recheck_s: float | None = 2.0,
        verify: Callable[[Users, str, str], User | None] | None = None,
    ) -> None:
        if max_hashing < 1 or max_per_source < 1 or max_waiting < 1:
            raise ValueError("login concurrency limits must be positive")
        self.users = users
        self._clock = clock
        self._sleep = sleep
        self._max_hashing = max_hashing
        self._max_per_source = max_per_source
        self._max_waiting = max_waiting
        self._base_delay = base_delay
        self._max_delay = max_delay
        self._quiet = quiet
        self._recheck_s = recheck_s
        self._verify = verify or Users.authenticate
        self._key = os.urandom(32)  # per process: a remembered digest is useless anywhere else
        self._verified: dict[str, bytes] = {}  # user name -> HMAC of (name, password) last verified
        self._penalties: dict[str, _Penalty] = {}
        self._file_stamp = _stamp(users.path) if users is not None else None
        self._next_recheck = clock() + (recheck_s or 0.0)
        self._executor: ThreadPoolExecutor | None = None
        # The fair queue of the hashing slots: waiting attempts by source, served one source after another.
        self._hashing = 0
        self._queues: dict[str, deque[asyncio.Future[None]]] = {}
        self._waiting = 0

    def close(self) -> None:
        """Stop the hashing threads (on broker shutdown); a hash already running finishes in its thread."""
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    # --- logins ---------------------------------------------------------------------------------------------

    async def login(self, username: str | None, password: bytes | None, address: str) -> LoginResult:
        """Check one CONNECT's credentials, coming from IP `address`."""
        self._recheck_file()
        users = self.users
        if users is None:
            return _anonymous(address)
        if username is None:
            return LoginResult(Outcome.NOT_AUTHORIZED, None, "no user name")
        if password is None:
            return LoginResult(Outcome.BAD_CREDENTIALS, None, "no password")
        try:
            text = password.decode()
        except UnicodeDecodeError:
            # Passwords are set as text by `spotbox users add`: bytes that are not UTF-8 match none of them.
            return LoginResult(Outcome.BAD_CREDENTIALS, None, "password is not UTF-8")
        digest = hmac.new(self._key, username.encode() + b"\0" + password, hashlib.sha256).digest()
        remembered = self._verified.get(username)
        if remembered is not None and hmac.compare_digest(remembered, digest):
            return LoginResult(Outcome.OK, username, "password verified before")
        return await self._check(users, username, text, digest, source_of(address))

    async def _check(self, users: Users, username: str, password: str, digest: bytes, source: str) -> LoginResult:
        """The argon2 check, after the source's penalty delay, in a bounded and fair pool."""
        now = self._clock()
        penalty = self._penalty(source, now)
        if self._waiting >= self._max_waiting or (penalty is not None and penalty.waiting >= self._max_per_source):
            return LoginResult(Outcome.BUSY, None, "too many logins waiting")
        queued = self._queues.get(source)
        if queued is not None and len(queued) >= self._max_per_source:
            return LoginResult(Outcome.BUSY, None, "too many logins waiting from this address")
        self._waiting += 1
        if penalty is not None:
            penalty.waiting += 1
        try:
            if penalty is not None:
                # Attempts from a penalised address are spaced: each takes the next slot, one delay apart.
                at = max(now, penalty.next_at)
                penalty.next_at = at + self._delay(penalty.failures)
                if at > now:
                    await self._sleep(at - now)
            user = await self._hash(users, username, password, source)
        finally:
            self._waiting -= 1
            if penalty is not None:
                penalty.waiting -= 1
        if self.users is not users:
            return LoginResult(Outcome.BUSY, None, "users file changed during the check")
        if user is None:
            self._failed(source)
            return LoginResult(Outcome.BAD_CREDENTIALS, None, "bad user name or password")
        self._penalties.pop(source, None)  # a success forgives the address
        self._verified[username] = digest
        return LoginResult(Outcome.OK, username, "password verified")

    def _penalty(self, source: str, now: float) -> _Penalty | None:
        penalty = self._penalties.get(source)
        if penalty is not None and not penalty.waiting and now - penalty.last_failure >= self._quiet:
            del self._penalties[source]  # a quiet minute forgives the address
            return None
        return penalty

    def _delay(self, failures: int) -> float:
        return min(self._max_delay, self._base_delay * 2.0 ** min(failures - 1, 32))

    def _failed(self, source: str) -> None:
        now = self._clock()
        penalty = self._penalties.get(source)
        if penalty is None:
            if len(self._penalties) >= _MAX_PENALISED:
                self._forget_quiet(now)
            penalty = self._penalties[source] = _Penalty(0, now, now)
        penalty.failures += 1
        penalty.last_failure = now
        penalty.next_at = max(penalty.next_at, now + self._delay(penalty.failures))

    def _forget_quiet(self, now: float) -> None:
        """Keep the penalty table bounded: drop quiet addresses, then the oldest if it is still full."""
        for source in [s for s, p in self._penalties.items() if not p.waiting and now - p.last_failure >= self._quiet]:
            del self._penalties[source]
        while len(self._penalties) >= _MAX_PENALISED:
            del self._penalties[next(iter(self._penalties))]

    async def _hash(self, users: Users, username: str, password: str, source: str) -> User | None:
        """Run one argon2 check in a hashing thread once this source's turn for a slot comes."""
        await self._acquire(source)
        try:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(self._max_hashing, thread_name_prefix="spotbox-login")
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._executor, self._verify, users, username, password)
        finally:
            self._release()

    async def _acquire(self, source: str) -> None:
        if self._hashing < self._max_hashing and not self._queues:
            self._hashing += 1
            return
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queues.setdefault(source, deque()).append(turn)
        try:
            await turn
        except asyncio.CancelledError:
            if turn.done() and not turn.cancelled():
                self._release()  # the slot was handed over just as this attempt was cancelled: pass it on
            else:
                queue = self._queues.get(source)
                if queue is not None and turn in queue:
                    queue.remove(turn)
                    if not queue:
                        del self._queues[source]
            raise

    def _release(self) -> None:
        """Hand the slot to the longest-waiting source's next attempt, that source then going last."""
        while self._queues:
            source = next(iter(self._queues))
            queue = self._queues.pop(source)
            turn = queue.popleft()
            if queue:
                self._queues[source] = queue  # to the back of the round
            if not turn.done():
                turn.set_result(None)
                return
        self._hashing -= 1

    def _recheck_file(self) -> None:
        """Reload the users file when it changed (at most every `recheck_s`), forgetting verified passwords."""
        if self.users is None or self._recheck_s is None:
            return
        now = self._clock()
        if now < self._next_recheck:
            return
        self._next_recheck = now + self._recheck_s
        stamp = _stamp(self.users.path)
        if stamp == self._file_stamp:
            return
        self._file_stamp = stamp
        try:
            users = Users.load(self.users.path)
        except ConfigError as exc:
            logger.error("users file not reloaded, the previous users stay: %s", exc)
            return
        self.reload(users)
        logger.info("users file %s reloaded: %d users", users.path, len(users.by_name))

    def reload(self, users: Users) -> None:
        """Use `users` from now on; every remembered password must be checked again."""
        self.users = users
        self._verified.clear()

    # --- grants ---------------------------------------------------------------------------------------------

    def may_publish(self, user: str | None, topic: str) -> bool:
        """True when `user` may publish to `topic` (anyone may, in the anonymous local-only mode)."""
        if self.users is None:
            return True
        granted = self.users.by_name.get(user) if user is not None else None
        return granted is not None and granted.may_publish(topic)

    def may_subscribe(self, user: str | None, topic_filter: str) -> bool:
        """True when `user` may subscribe to `topic_filter`; a shared filter is judged by the filter it shares."""
        if self.users is None:
            return True
        granted = self.users.by_name.get(user) if user is not None else None
        if granted is None:
            return False
        shared = parse_shared(topic_filter)
        if isinstance(shared, str):
            return False  # an invalid $share filter grants nothing
        return granted.may_subscribe(topic_filter if shared is None else shared[1])


def _anonymous(address: str) -> LoginResult:
    """The local-only mode without a users file (SPEC 7): any client on loopback, nobody else."""
    if from_loopback(address):
        return LoginResult(Outcome.OK, None, "anonymous on loopback")
    return LoginResult(Outcome.NOT_AUTHORIZED, None, "anonymous clients only from loopback without --users")


# Addresses with failed logins remembered at once; past it the quiet ones, then the oldest, are forgotten.
_MAX_PENALISED = 100_000


def _stamp(path: Path) -> tuple[int, int, int] | None:
    """What changes when the users file is replaced or rewritten: inode, size, modification time."""
    try:
        stat = path.stat()
    except OSError:
        return None
    return stat.st_ino, stat.st_size, stat.st_mtime_ns
