"""Logins and grants of the new engine: real argon2 hashes, an injected clock, no sockets and no real waiting."""

from __future__ import annotations

import asyncio
import itertools
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from argon2 import PasswordHasher

from spotbox.mqtt.auth import Authenticator, LoginResult, Outcome, from_loopback, source_of
from spotbox.users import User, Users

PASSWORDS = {"ROBOT-A": "secret-a", "ROBOT-B": "secret-b", "OPS": "ops-pass"}
# Real argon2id hashes with the cheapest parameters: verifying reads the parameters from the hash, so the
# check is the real one at a fraction of a millisecond instead of the production hash's tens.
CHEAP = PasswordHasher(time_cost=1, memory_cost=64, parallelism=1)
HASHES = {name: CHEAP.hash(password) for name, password in PASSWORDS.items()}


class FakeTime:
    """A clock that only moves when the code under test sleeps (or the test says so)."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []
        self.wakes: list[float] = []  # when each sleep ends, on this clock

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.wakes.append(self.now + seconds)
        self.now += seconds
        await asyncio.sleep(0)


class CountingVerify:
    """The real argon2 check, counting calls and how many run at once."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.running = 0
        self.most = 0
        self._lock = threading.Lock()

    def __call__(self, users: Users, name: str, password: str) -> User | None:
        with self._lock:
            self.calls.append(name)
            self.running += 1
            self.most = max(self.most, self.running)
        try:
            return users.authenticate(name, password)
        finally:
            with self._lock:
                self.running -= 1


def users_file(path: Path, hashes: dict[str, str] | None = None) -> Users:
    """A saved users file with the module's users and grants (OPS may publish and read everything under robot/)."""
    hashes = hashes or HASHES
    by_name = {name: User(name, password_hash) for name, password_hash in hashes.items()}
    if "OPS" in by_name:
        by_name["OPS"] = User("OPS", hashes["OPS"], publish=("robot/+/cmd",), subscribe=("robot/#",))
    users = Users(path / "users.json", by_name)
    users.save()
    return users


@pytest.fixture
def fake_time() -> FakeTime:
    """The injected clock and sleep."""
    return FakeTime()


@pytest.fixture
def verify() -> CountingVerify:
    """A counting wrapper around the real password check."""
    return CountingVerify()


@pytest.fixture
def make_auth(tmp_path: Path, fake_time: FakeTime, verify: CountingVerify) -> Iterator[Callable[..., Authenticator]]:
    """Build an Authenticator on a real users file with the fake clock; closed after the test."""
    made: list[Authenticator] = []

    def make(**options: object) -> Authenticator:
        auth = Authenticator(
            users_file(tmp_path),
            clock=fake_time.clock,
            sleep=fake_time.sleep,
            verify=verify,
            **options,  # type: ignore[arg-type]
        )
        made.append(auth)
        return auth

    yield make
    for auth in made:
        auth.close()


def login(auth: Authenticator, name: str | None, password: str | bytes | None, address: str) -> LoginResult:
    """One login, run to completion."""
    raw = password.encode() if isinstance(password, str) else password
    return asyncio.run(auth.login(name, raw, address))


@pytest.mark.parametrize("address", ["127.0.0.1", "127.8.9.10", "::1", "::ffff:127.0.0.1"])
async def test_without_users_anonymous_clients_on_loopback_are_accepted(address: str) -> None:
    """Test that without a users file a loopback client connects, with or without a user name (SPEC 7)."""
    auth = Authenticator(None)
    for name in (None, "anyone"):
        result = await auth.login(name, None, address)
        assert result.ok
        assert (result.code311, result.code5) == (0, 0x00)
    assert auth.may_publish(None, "robot/X/status")
    assert auth.may_subscribe(None, "#")


@pytest.mark.parametrize("address", ["10.0.0.7", "192.168.1.2", "2001:db8::1", "::ffff:10.0.0.7", "", "localhost"])
async def test_without_users_other_addresses_are_not_authorized(address: str) -> None:
    """Test that without a users file a non-loopback (or unknown) peer is refused with not authorized."""
    result = await Authenticator(None).login(None, None, address)
    assert result.outcome is Outcome.NOT_AUTHORIZED
    assert (result.code311, result.code5) == (5, 0x87)


async def test_a_right_password_logs_in_as_its_user(make_auth: Callable[..., Authenticator]) -> None:
    """Test that a user's right password is accepted and the result names the user."""
    result = await make_auth().login("ROBOT-A", b"secret-a", "10.0.0.1")
    assert result.ok
    assert result.user == "ROBOT-A"


@pytest.mark.parametrize(
    ("name", "password", "outcome"),
    [
        ("ROBOT-A", b"wrong", Outcome.BAD_CREDENTIALS),
        ("ROBOT-A", b"secret-b", Outcome.BAD_CREDENTIALS),
        ("NOBODY", b"secret-a", Outcome.BAD_CREDENTIALS),  # checked against a full-cost hash, as in use
        ("ROBOT-A", None, Outcome.BAD_CREDENTIALS),
        ("ROBOT-A", b"\xff\xfe", Outcome.BAD_CREDENTIALS),
        (None, None, Outcome.NOT_AUTHORIZED),
    ],
)
async def test_bad_logins_are_refused_with_their_code(
    make_auth: Callable[..., Authenticator], name: str | None, password: bytes | None, outcome: Outcome
) -> None:
    """Test that wrong, missing or undecodable passwords and unknown users get bad credentials, no user name gets
    not authorized, and none of them logs in."""
    result = await make_auth().login(name, password, "10.0.0.1")
    assert result.outcome is outcome
    assert result.user is None
    assert result.code311 == 5  # 3.1.1: "not authorized", as Mosquitto answers a wrong password
    assert result.code5 == (0x86 if outcome is Outcome.BAD_CREDENTIALS else 0x87)


async def test_a_reconnect_with_a_verified_password_costs_no_hash(
    make_auth: Callable[..., Authenticator], verify: CountingVerify
) -> None:
    """Test that a robot's reconnects with the password it proved skip argon2, while another password is checked."""
    auth = make_auth()
    assert (await auth.login("ROBOT-A", b"secret-a", "10.0.0.1")).ok
    for _ in range(20):
        assert (await auth.login("ROBOT-A", b"secret-a", "10.0.0.2")).ok
    assert verify.calls == ["ROBOT-A"]
    assert (await auth.login("ROBOT-A", b"secret-a-but-not", "10.0.0.1")).outcome is Outcome.BAD_CREDENTIALS
    assert (await auth.login("ROBOT-B", b"secret-a", "10.0.0.1")).outcome is Outcome.BAD_CREDENTIALS
    assert verify.calls == ["ROBOT-A", "ROBOT-A", "ROBOT-B"]
    assert (await auth.login("ROBOT-A", b"secret-a", "10.0.0.1")).ok  # still remembered after a failure


async def test_a_changed_users_file_forgets_verified_passwords(
    make_auth: Callable[..., Authenticator], tmp_path: Path, fake_time: FakeTime, verify: CountingVerify
) -> None:
    """Test that after the users file changes (new password, removed user), old passwords no longer log in."""
    auth = make_auth(recheck_s=2.0)
    assert (await auth.login("ROBOT-A", b"secret-a", "10.0.0.1")).ok
    assert (await auth.login("ROBOT-B", b"secret-b", "10.0.0.1")).ok
    users_file(tmp_path, {"ROBOT-A": CHEAP.hash("new-a")})  # ROBOT-A's password changed, ROBOT-B removed
    fake_time.now += 2.0
    assert (await auth.login("ROBOT-A", b"secret-a", "10.0.0.1")).outcome is Outcome.BAD_CREDENTIALS
    assert (await auth.login("ROBOT-B", b"secret-b", "10.0.0.3")).outcome is Outcome.BAD_CREDENTIALS
    assert (await auth.login("ROBOT-A", b"new-a", "10.0.0.4")).ok
    assert not auth.may_publish("ROBOT-B", "robot/ROBOT-B/status")


async def test_a_broken_users_file_keeps_the_previous_users(
    make_auth: Callable[..., Authenticator], tmp_path: Path, fake_time: FakeTime, caplog: pytest.LogCaptureFixture
) -> None:
    """Test that a users file that cannot be read is logged and the users loaded before stay in force."""
    auth = make_auth(recheck_s=2.0)
    (tmp_path / "users.json").write_text("{not json")
    fake_time.now += 5.0
    assert (await auth.login("ROBOT-A", b"secret-a", "10.0.0.1")).ok
    assert "users file not reloaded" in caplog.text


async def test_failed_logins_slow_their_address_with_a_growing_capped_delay(
    make_auth: Callable[..., Authenticator], fake_time: FakeTime, verify: CountingVerify
) -> None:
    """Test that each failure from an address delays its next check, 0.1 s doubling to at most 5 s, before
    any hash is computed."""
    auth = make_auth()
    for _ in range(9):
        assert (await auth.login("ROBOT-A", b"guess", "203.0.113.9")).outcome is Outcome.BAD_CREDENTIALS
    assert fake_time.sleeps == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0])
    assert len(verify.calls) == 9


async def test_a_success_or_a_quiet_minute_forgives_an_address(
    make_auth: Callable[..., Authenticator], fake_time: FakeTime
) -> None:
    """Test that the penalty of an address ends after a successful login, or after a minute without failures."""
    auth = make_auth()
    for _ in range(3):
        await auth.login("ROBOT-A", b"guess", "203.0.113.9")
    assert (await auth.login("ROBOT-B", b"secret-b", "203.0.113.9")).ok
    fake_time.sleeps.clear()
    await auth.login("ROBOT-A", b"guess", "203.0.113.9")
    assert fake_time.sleeps == []  # the first failure after a success: no delay yet
    await auth.login("ROBOT-A", b"guess", "203.0.113.9")
    fake_time.now += 60.0
    fake_time.sleeps.clear()
    await auth.login("ROBOT-A", b"guess", "203.0.113.9")
    assert fake_time.sleeps == []


async def test_others_failures_never_slow_or_lock_out_a_right_password(
    make_auth: Callable[..., Authenticator], fake_time: FakeTime
) -> None:
    """Test that after many failures against ROBOT-A from one address, ROBOT-A logs in at once from another
    address, and a robot that proved its password before logs in at once even from the guessing address."""
    auth = make_auth()
    assert (await auth.login("ROBOT-B", b"secret-b", "203.0.113.9")).ok
    for _ in range(6):
        await auth.login("ROBOT-A", b"guess", "203.0.113.9")
    fake_time.sleeps.clear()
    assert (await auth.login("ROBOT-A", b"secret-a", "198.51.100.1")).ok
    assert (await auth.login("ROBOT-B", b"secret-b", "203.0.113.9")).ok
    assert fake_time.sleeps == []


async def test_attempts_from_a_penalised_address_are_spaced_even_when_concurrent(
    make_auth: Callable[..., Authenticator], fake_time: FakeTime
) -> None:
    """Test that concurrent guesses from one penalised address each wait their own slot, not one shared delay."""
    auth = make_auth()
    for _ in range(3):
        await auth.login("ROBOT-A", b"guess", "203.0.113.9")  # now 0.4 s per attempt
    fake_time.wakes.clear()
    results = await asyncio.gather(*(auth.login("ROBOT-A", b"guess", "203.0.113.9") for _ in range(4)))
    assert all(r.outcome is Outcome.BAD_CREDENTIALS for r in results)
    # Each is checked in its own slot, at least one delay after the one before it.
    wakes = sorted(fake_time.wakes)
    assert len(wakes) == 4
    assert all(later - earlier >= 0.4 - 1e-9 for earlier, later in itertools.pairwise(wakes))


async def test_a_flood_from_one_address_does_not_delay_another(
    make_auth: Callable[..., Authenticator], verify: CountingVerify
) -> None:
    """Test that with 60 guesses queued from one address, a login from another is served within a few hashes,
    and guesses past the per-address bound are refused at once as busy."""
    auth = make_auth(max_hashing=1, max_per_source=8)
    flood = [asyncio.create_task(auth.login("ROBOT-A", b"guess", "203.0.113.9")) for _ in range(60)]
    await asyncio.sleep(0)
    good = await auth.login("ROBOT-B", b"secret-b", "198.51.100.1")
    assert good.ok
    hashes_before_good = verify.calls.index("ROBOT-B")
    assert hashes_before_good <= 2
    results = await asyncio.gather(*flood)
    busy = [r for r in results if r.outcome is Outcome.BUSY]
    assert len(busy) >= 60 - 1 - 8  # one hashing, eight waiting, the rest refused without a hash
    assert (busy[0].code311, busy[0].code5) == (3, 0x89)
    assert len(verify.calls) <= 1 + 8 + 1


async def test_at_most_max_hashing_hashes_run_at_once(
    make_auth: Callable[..., Authenticator], verify: CountingVerify
) -> None:
    """Test that many logins from many addresses never run more than `max_hashing` argon2 checks at once."""
    auth = make_auth(max_hashing=2)
    results = await asyncio.gather(
        *(auth.login("ROBOT-A" if n % 2 else "ROBOT-B", b"nope", f"10.1.0.{n}") for n in range(12))
    )
    assert all(r.outcome is Outcome.BAD_CREDENTIALS for r in results)
    assert verify.most <= 2
    assert len(verify.calls) == 12


async def test_past_max_waiting_logins_fail_fast_as_busy(
    make_auth: Callable[..., Authenticator], verify: CountingVerify
) -> None:
    """Test that when `max_waiting` logins are already waiting, a further one is refused at once, unhashed."""
    auth = make_auth(max_hashing=1, max_waiting=3)
    tasks = [asyncio.create_task(auth.login("ROBOT-A", b"x", f"10.2.0.{n}")) for n in range(3)]
    await asyncio.sleep(0)
    refused = await auth.login("ROBOT-A", b"secret-a", "10.2.0.99")
    assert refused.outcome is Outcome.BUSY
    await asyncio.gather(*tasks)
    assert len(verify.calls) == 3
    assert (await auth.login("ROBOT-A", b"secret-a", "10.2.0.99")).ok  # capacity is back once they finished


async def test_a_cancelled_login_gives_its_place_back(
    make_auth: Callable[..., Authenticator], verify: CountingVerify
) -> None:
    """Test that logins cancelled while waiting (client gone, CONNECT deadline) leave no slot or queue taken."""
    auth = make_auth(max_hashing=1, max_waiting=4)
    tasks = [asyncio.create_task(auth.login("ROBOT-A", b"x", f"10.3.0.{n}")) for n in range(4)]
    await asyncio.sleep(0)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    results = await asyncio.gather(*(auth.login("ROBOT-B", b"secret-b", f"10.4.0.{n}") for n in range(4)))
    assert all(r.ok for r in results)


def test_grants_follow_the_users_file(make_auth: Callable[..., Authenticator]) -> None:
    """Test publish and subscribe grants: own topics, granted filters, shared filters judged by their filter."""
    auth = make_auth()
    assert auth.may_publish("ROBOT-A", "robot/ROBOT-A/status")
    assert not auth.may_publish("ROBOT-A", "robot/ROBOT-B/status")
    assert auth.may_publish("OPS", "robot/ROBOT-A/cmd")
    assert not auth.may_publish("NOBODY", "robot/NOBODY/status")
    assert not auth.may_publish(None, "robot/ROBOT-A/status")
    assert auth.may_subscribe("ROBOT-A", "robot/ROBOT-A/#")
    assert not auth.may_subscribe("ROBOT-A", "robot/#")
    assert auth.may_subscribe("OPS", "$share/ops/robot/+/status")
    assert not auth.may_subscribe("ROBOT-A", "$share/g/robot/ROBOT-B/status")
    assert auth.may_subscribe("ROBOT-A", "$share/g/robot/ROBOT-A/status")
    assert not auth.may_subscribe("OPS", "$share//robot/#")  # an invalid share grants nothing
    assert not auth.may_subscribe(None, "robot/ROBOT-A/#")


@pytest.mark.parametrize(
    ("address", "source"),
    [
        ("203.0.113.9", "203.0.113.9"),
        ("::ffff:203.0.113.9", "203.0.113.9"),
        ("2001:db8:1:2:aaaa::1", "2001:db8:1:2::/64"),
        ("2001:db8:1:2:bbbb::7", "2001:db8:1:2::/64"),
    ],
)
def test_failures_are_counted_per_ipv4_address_and_ipv6_64(address: str, source: str) -> None:
    """Test that one IPv6 host cannot dodge its penalty by rotating through its /64."""
    assert source_of(address) == source
    assert not from_loopback(address)
