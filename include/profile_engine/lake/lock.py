"""The lake lock ``_meta/lock``: one writer of the cumulative state at a time, stale locks taken over.

Its holder first recovers interrupted commits and cleans ``_tmp/`` leftovers. docs/reliability.md (1, 2).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import uuid
from collections.abc import Generator
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

from profile_engine.lake import faults
from profile_engine.config import Settings
from profile_engine.lake.storage import LOCK, Lake, clean_tmp_leftovers, pid_alive, recover_commits

log = logging.getLogger(__name__)

DEFAULT_TTL = timedelta(hours=2)  # longer than any hour takes; a crashed run frees the lake after this
UNREADABLE_GRACE = timedelta(minutes=1)

Scope = Literal["process", "run"]


class LakeLocked(RuntimeError):
    """Another live run holds the lake lock."""


@dataclass(frozen=True)
class LockOwner:
    """Who holds the lock, and until when."""

    run_id: str
    host: str
    pid: int
    scope: str
    acquired_at: str
    expires_at: str
    token: str

    @classmethod
    def mine(cls, run_id: str, scope: Scope, ttl: timedelta, now: datetime | None = None) -> LockOwner:
        """An owner record for this process."""
        now = now or datetime.now(UTC)
        return cls(
            run_id, socket.gethostname(), os.getpid(), scope, now.isoformat(), (now + ttl).isoformat(), uuid.uuid4().hex
        )

    def expired(self, now: datetime) -> bool:
        """Whether the expiry has passed."""
        return datetime.fromisoformat(self.expires_at) <= now

    def process_dead(self) -> bool:
        """Whether a process-scoped owner on this host is no longer running."""
        return self.scope == "process" and self.host == socket.gethostname() and not pid_alive(self.pid)

    def is_me(self) -> bool:
        """Whether this process holds it."""
        return self.host == socket.gethostname() and self.pid == os.getpid()


_depth: dict[Path, int] = {}


def lock_path(lake: Lake) -> Path:
    """``<lake>/_meta/lock``."""
    return lake.path(LOCK)


def read_owner(lake: Lake) -> LockOwner | None:
    """The current owner, or None when the lock is free or unreadable."""
    try:
        return LockOwner(**json.loads(lock_path(lake).read_text()))
    except FileNotFoundError:
        return None
    except (ValueError, TypeError):
        return None


def acquire(
    lake: Lake, run_id: str, *, scope: Scope = "process", ttl: timedelta = DEFAULT_TTL, now: datetime | None = None
) -> tuple[LockOwner, bool]:
    """Take the lock (or join it when ``run_id`` already holds it); returns the owner and whether it was new.

    Raises ``LakeLocked`` naming the owner when another live, unexpired run holds it.
    Interrupted commits of dead writers are recovered first; a new holder (not a join)
    then removes stale ``_tmp/`` leftovers.
    """
    faults.check_env()
    now = now or datetime.now(UTC)
    path = lock_path(lake)
    path.parent.mkdir(parents=True, exist_ok=True)
    for _attempt in range(5):
        mine = LockOwner.mine(run_id, scope, ttl, now)
        if _create(path, mine):
            _recover(lake)
            removed = clean_tmp_leftovers(lake)
            if removed:
                log.info("lake lock: removed %d stale _tmp leftovers", len(removed))
            return mine, True
        owner = read_owner(lake)
        if owner is None:
            if not path.exists():
                continue  # released meanwhile: try again
            age = now - datetime.fromtimestamp(path.stat().st_mtime, UTC)
            if age < UNREADABLE_GRACE:
                raise LakeLocked(f"{path} is being written by another run (unreadable, {age.total_seconds():.0f}s old)")
            _take_over(path, None, "unreadable lock file")
            continue
        if owner.run_id == run_id and (scope == "run" or owner.is_me()):
            renewed = LockOwner(**{**asdict(owner), "expires_at": (now + ttl).isoformat()})
            _rewrite(path, renewed)
            _recover(lake)  # a task of this run that died in a commit (its retry joins)
            return renewed, False
        if owner.expired(now):
            _take_over(path, owner, f"expired at {owner.expires_at}")
            continue
        if owner.process_dead():
            _take_over(path, owner, f"owner process {owner.pid} on {owner.host} is gone")
            continue
        raise LakeLocked(
            f"the lake {lake.root} is locked by run {owner.run_id} (host {owner.host}, pid {owner.pid}) "
            f"until {owner.expires_at}; hours must run one at a time"
        )
    raise LakeLocked(f"could not take {path}: it kept changing hands")


def _recover(lake: Lake) -> None:
    """Finish or roll back partition commits of dead writers (``lake.recover_commits``), logged."""
    for action in recover_commits(lake):
        log.warning("lake lock: interrupted commit recovered: %s", action)


def release(lake: Lake, owner: LockOwner) -> bool:
    """Remove the lock if ``owner`` (same token) still holds it; returns whether it did."""
    current = read_owner(lake)
    if current is None or current.token != owner.token:
        log.warning("lake lock: %s no longer held by run %s (now %s)", lock_path(lake), owner.run_id, current)
        return False
    lock_path(lake).unlink(missing_ok=True)
    return True


@contextmanager
def hold_lake(lake: Lake, run_id: str, *, ttl: timedelta = DEFAULT_TTL) -> Generator[LockOwner, None, None]:
    """Hold the lock for the duration of the block (re-entrant in one process); released in ``finally``."""
    key = lake.root.resolve()
    if _depth.get(key, 0) > 0:
        current = read_owner(lake)
        if current is not None and current.is_me():
            _depth[key] += 1
            try:
                yield current
            finally:
                _depth[key] -= 1
            return
    owner, _new = acquire(lake, run_id, scope="process", ttl=ttl)
    _depth[key] = 1
    try:
        yield owner
    finally:
        _depth[key] = 0
        release(lake, owner)


def join_run(settings: Settings, run_id: str, *, ttl: timedelta = DEFAULT_TTL) -> dict[str, Any]:
    """For a DAG task: take the lock for ``run_id`` or join it (renewing its expiry); ``LakeLocked`` otherwise."""
    owner, new = acquire(Lake(settings.lake), run_id, scope="run", ttl=ttl)
    return {"run_id": owner.run_id, "new": new, "expires_at": owner.expires_at}


def release_run(settings: Settings, run_id: str) -> bool:
    """For the DAG's last task: release the lock if ``run_id`` holds it; returns whether it did."""
    lake = Lake(settings.lake)
    owner = read_owner(lake)
    if owner is None or owner.run_id != run_id:
        return False
    return release(lake, owner)


def _create(path: Path, owner: LockOwner) -> bool:
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as handle:
        handle.write(json.dumps(asdict(owner), sort_keys=True))
    return True


def _rewrite(path: Path, owner: LockOwner) -> None:
    tmp = path.with_name(f"{path.name}.{owner.token}.{os.getpid()}.renew")
    tmp.write_text(json.dumps(asdict(owner), sort_keys=True))
    os.replace(tmp, path)


def _take_over(path: Path, stale: LockOwner | None, why: str) -> None:
    """Move a stale lock aside (atomic rename); put it back if it turned out to be a fresh one."""
    aside = path.with_name(f"{path.name}.stale.{uuid.uuid4().hex}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return
    try:
        moved: LockOwner | None = LockOwner(**json.loads(aside.read_text()))
    except (ValueError, TypeError):
        moved = None
    if stale is not None and (moved is None or moved.token != stale.token):
        # Another run took the stale lock over first: give its fresh lock back.
        with suppress(FileExistsError):
            os.link(aside, path)
        aside.unlink(missing_ok=True)
        return
    log.warning("lake lock: took over stale lock of %s (%s)", stale.run_id if stale else "unknown run", why)
    aside.unlink(missing_ok=True)


def status(settings: Settings, *, force_release: bool = False) -> dict[str, Any]:
    """The lock's owner and whether it is stale (for ``python -m profile_engine lock``).

    ``force_release`` removes it whoever holds it (an operator's decision, logged):
    for a DAG run that died without its ``write_run_report``, before the expiry.
    """
    lake = Lake(settings.lake)
    owner = read_owner(lake)
    now = datetime.now(UTC)
    result: dict[str, Any] = {
        "lock": str(lock_path(lake)),
        "held": lock_path(lake).exists(),
        "owner": None if owner is None else asdict(owner),
        "stale": owner is not None and (owner.expired(now) or owner.process_dead()),
        "released": False,
    }
    if force_release and result["held"]:
        log.warning("lake lock: released by hand (owner %s)", owner.run_id if owner else "unreadable")
        lock_path(lake).unlink(missing_ok=True)
        result["released"] = True
    return result
