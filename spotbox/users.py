"""The MQTT users file: who may connect (argon2id password hashes) and which topics each may use.

The file is JSON, written only by `spotbox users` (atomically, mode 0600):

    {"version": 1,
     "users": {"ROBOT-001": {"password": "$argon2id$v=19$m=19456,t=2,p=1$...", "publish": [], "subscribe": []}}}

Every user may publish to `robot/{name}/status` and subscribe to `robot/{name}/#`; `publish` and `subscribe`
list further MQTT topic filters the user is granted (an operator's `robot/#`, for instance).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import os
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import orjson
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from spotbox.errors import ConfigError
from spotbox.status import SERIAL_RULE, is_valid_serial

FORMAT_VERSION = 1
# argon2id with OWASP's minimum recommended parameters (19 MiB, 2 passes, 1 lane): about 20 ms per check here.
# The parameters are written into every hash, so raising them later still verifies the hashes already stored.
HASHER = PasswordHasher(time_cost=2, memory_cost=19 * 1024, parallelism=1)


class UsersFileError(ConfigError):
    """The users file cannot be read or is not a spotbox users file."""

    def __init__(self, path: Path, message: str) -> None:
        super().__init__("--users", f"{path}: {message}")


def check_filter(topic_filter: str) -> str | None:
    """Why `topic_filter` is not a valid MQTT topic filter, or None when it is."""
    if not topic_filter or "\0" in topic_filter:
        return "a topic filter must be non-empty text without NUL"
    levels = topic_filter.split("/")
    for index, level in enumerate(levels):
        if "#" in level and (level != "#" or index != len(levels) - 1):
            return f"{topic_filter!r}: '#' must be a whole level, and the last"
        if "+" in level and level != "+":
            return f"{topic_filter!r}: '+' must be a whole level"
    return None


def filter_covers(granted: str, requested: str) -> bool:
    """True when every topic that `requested` (a topic or a filter) matches is matched by `granted`."""
    wanted = requested.split("/")
    if wanted[0].startswith("$") and granted.split("/", 1)[0] in ("+", "#"):
        return False  # [MQTT-4.7.2-1] wildcards at the first level never match $-topics
    levels = granted.split("/")
    for index, level in enumerate(levels):
        if level == "#":
            return True  # "a/#" also matches "a" itself
        if index >= len(wanted):
            return False
        if level == "+":
            if wanted[index] == "#":
                return False
            continue
        if level != wanted[index]:
            return False
    return len(wanted) == len(levels)


@dataclass(frozen=True)
class User:
    """One MQTT user: a password hash and the topic filters granted beyond the robot's own."""

    name: str
    password_hash: str
    publish: tuple[str, ...] = ()
    subscribe: tuple[str, ...] = ()
    # The operator's grant: register, change and remove robots over HTTP (POST/PATCH/DELETE /robots).
    manage: bool = False

    @property
    def publish_filters(self) -> tuple[str, ...]:
        """Where the user may publish: its own status topic, then the grants."""
        return (f"robot/{self.name}/status", *self.publish)

    @property
    def subscribe_filters(self) -> tuple[str, ...]:
        """What the user may subscribe to: its own topics, then the grants."""
        return (f"robot/{self.name}/#", *self.subscribe)

    def may_publish(self, topic: str) -> bool:
        """True when the user may publish to `topic`."""
        return any(filter_covers(granted, topic) for granted in self.publish_filters)

    def may_subscribe(self, topic_filter: str) -> bool:
        """True when the user may subscribe to `topic_filter`."""
        return any(filter_covers(granted, topic_filter) for granted in self.subscribe_filters)

    def to_json(self) -> dict[str, Any]:
        """The user's entry in the file."""
        entry = {"password": self.password_hash, "publish": list(self.publish), "subscribe": list(self.subscribe)}
        return {**entry, "manage": True} if self.manage else entry


def hash_password(password: str) -> str:
    """An argon2id hash of `password` (PHC string: algorithm, parameters, salt and hash)."""
    return HASHER.hash(password)


def make_user(
    name: str, password: str, publish: Iterable[str] = (), subscribe: Iterable[str] = (), *, manage: bool = False
) -> User:
    """A new user entry; raises ValueError naming what is wrong with the name, password or grants."""
    if not is_valid_serial(name):
        raise ValueError(f"user name {name!r} {SERIAL_RULE} (it is the robot's serial number)")
    if not password:
        raise ValueError("the password must not be empty")
    grants = (*publish, *subscribe)
    if problem := next((p for p in map(check_filter, grants) if p), None):
        raise ValueError(problem)
    return User(name, hash_password(password), tuple(publish), tuple(subscribe), manage)


def _parse_user(path: Path, name: Any, entry: Any) -> User:
    if not isinstance(name, str) or not is_valid_serial(name):
        raise UsersFileError(path, f"user name {name!r} {SERIAL_RULE}")
    if not isinstance(entry, dict) or not isinstance(entry.get("password"), str):
        raise UsersFileError(path, f"user {name!r} has no password hash")
    if not entry["password"].startswith("$argon2"):
        # Never accept a clear-text (or unknown) password that someone typed into the file.
        raise UsersFileError(path, f"user {name!r}: the password is not an argon2 hash; set it with spotbox users add")
    grants: dict[str, tuple[str, ...]] = {}
    for kind in ("publish", "subscribe"):
        filters = entry.get(kind, [])
        if not isinstance(filters, list) or not all(isinstance(f, str) for f in filters):
            raise UsersFileError(path, f"user {name!r}: {kind} must be a list of topic filters")
        if problem := next((p for p in map(check_filter, filters) if p), None):
            raise UsersFileError(path, f"user {name!r}: {problem}")
        grants[kind] = tuple(filters)
    manage = entry.get("manage", False)
    if not isinstance(manage, bool):
        raise UsersFileError(path, f"user {name!r}: manage must be true or false")
    return User(name, entry["password"], grants["publish"], grants["subscribe"], manage)


@dataclass(frozen=True)
class Users:
    """The users of one file, checked when loaded."""

    path: Path
    by_name: Mapping[str, User] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path, *, missing_ok: bool = False) -> Users:
        """Read and check the file; a missing file is an empty one only when `missing_ok`."""
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            if missing_ok:
                return cls(path)
            raise UsersFileError(path, "no such file; create it with spotbox users add NAME --file FILE") from None
        except OSError as exc:
            raise UsersFileError(path, exc.strerror or str(exc)) from None
        try:
            doc = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise UsersFileError(path, f"not JSON ({exc})") from None
        if not isinstance(doc, dict) or doc.get("version") != FORMAT_VERSION or not isinstance(doc.get("users"), dict):
            raise UsersFileError(path, f'not a spotbox users file ({{"version": {FORMAT_VERSION}, "users": {{...}}}})')
        return cls(path, {name: _parse_user(path, name, entry) for name, entry in doc["users"].items()})

    def with_user(self, user: User) -> Users:
        """A copy with `user` added or replaced."""
        return replace(self, by_name={**self.by_name, user.name: user})

    def without(self, name: str) -> Users:
        """A copy without user `name`."""
        return replace(self, by_name={k: v for k, v in self.by_name.items() if k != name})

    def save(self) -> None:
        """Write the file atomically (a temporary file renamed over it), readable by its owner only."""
        doc = {"version": FORMAT_VERSION, "users": {name: u.to_json() for name, u in sorted(self.by_name.items())}}
        data = orjson.dumps(doc, option=orjson.OPT_INDENT_2 | orjson.OPT_APPEND_NEWLINE)
        folder = self.path.parent
        # mkstemp creates the file with mode 0600, so the hashes are never readable by others, not even briefly.
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=folder)
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # the rename itself survives a power cut
        finally:
            os.close(dir_fd)

    def authenticate(self, name: str, password: str) -> User | None:
        """The user when `password` is theirs, else None; an unknown name costs the same hash check."""
        user = self.by_name.get(name)
        try:
            HASHER.verify(user.password_hash if user else _unknown_user_hash(), password)
        except (VerificationError, InvalidHashError):
            return None
        return user


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold the users file's lock around a load, change and save, so concurrent `spotbox users` lose no change.

    The lock is on `.NAME.lock` beside the file (the file itself is replaced on every save, so it cannot carry
    the lock); the kernel releases it when the holder exits, however it exits.
    """
    lock_path = path.with_name(f".{path.name}.lock")
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise UsersFileError(path, f"cannot lock {lock_path}: {exc.strerror or exc}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


@functools.cache
def _unknown_user_hash() -> str:
    """Verified against for unknown names, so that a refusal takes as long whether or not the name exists.

    Made at the first login, not at import: a hash costs tens of milliseconds, which every `spotbox` command paid
    at start, `spotbox users list` and `--help` included.
    """
    return HASHER.hash(os.urandom(16).hex())
