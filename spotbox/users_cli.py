"""`spotbox users`: add, remove and list the MQTT users of a users file."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import click

from spotbox.errors import ConfigError
from spotbox.users import Users, locked, make_user

FILE_OPTION = click.option(
    "--file",
    "path",
    envvar="SPOTBOX_USERS",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="The users file (the one given to spotbox run --users).",
)


def _load(path: Path, *, missing_ok: bool = False) -> Users:
    try:
        return Users.load(path, missing_ok=missing_ok)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    try:
        with locked(path):
            yield
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None


@click.group()
def users() -> None:
    """Manage the MQTT users file: passwords are stored as argon2id hashes, never in clear."""


@users.command()
@click.argument("name")
@FILE_OPTION
@click.option(
    "--password",
    prompt=True,
    hide_input=True,
    confirmation_prompt=True,
    help="The password (asked, twice, when not given; prefer that: a command line is visible to others).",
)
@click.option("--publish", multiple=True, help="A topic filter NAME may also publish to (repeatable).")
@click.option("--subscribe", multiple=True, help="A topic filter NAME may also subscribe to (repeatable).")
@click.option(
    "--manage/--no-manage", default=None, help="May register, change and remove robots (POST/PATCH/DELETE /robots)."
)
def add(
    name: str, path: Path, password: str, publish: tuple[str, ...], subscribe: tuple[str, ...], manage: bool | None
) -> None:
    """Add user NAME, or set a new password (and, when given, new grants) for an existing one."""
    try:
        # Hashed before taking the lock: the lock is held only for the load, change and save.
        user = make_user(name, password, publish, subscribe, manage=bool(manage))
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    with _locked(path):
        current = _load(path, missing_ok=True)
        previous = current.by_name.get(name)
        if previous is not None and not publish and not subscribe:
            user = replace(user, publish=previous.publish, subscribe=previous.subscribe)
        if previous is not None and manage is None:
            user = replace(user, manage=previous.manage)
        current.with_user(user).save()
    click.echo(f"{'updated' if previous else 'added'} user {name} in {path}")


@users.command()
@click.argument("name")
@FILE_OPTION
def remove(name: str, path: Path) -> None:
    """Remove user NAME; its connections are refused from the next start of spotbox run."""
    with _locked(path):
        current = _load(path)
        if name not in current.by_name:
            raise click.ClickException(f"{path}: no user {name!r}")
        current.without(name).save()
    click.echo(f"removed user {name} from {path}")


@users.command("list")
@FILE_OPTION
def list_users(path: Path) -> None:
    """Show each user and the topic filters it may publish and subscribe to."""
    for user in _load(path).by_name.values():
        publish, subscribe = ", ".join(user.publish_filters), ", ".join(user.subscribe_filters)
        click.echo(f"{user.name}\tpublish: {publish}\tsubscribe: {subscribe}")
