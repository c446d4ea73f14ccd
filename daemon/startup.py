"""Checks that make a start that cannot work fail at once, with one line naming the cause and
exit code 5 (`EXIT_CANNOT_START`), instead of a half-started node.

Each daemon owns its state directory and its model directory: it holds an exclusive
``fcntl.flock`` on a lock file in each for its whole life. A second daemon on either is refused;
the kernel drops the lock when the holder exits, however it exits, so a lock file left by a dead
process blocks nothing (the pid written into it is only there to be named in the message).
"""

from __future__ import annotations

import errno
import fcntl
import ipaddress
import os
from pathlib import Path

from edgemoe.daemon.config import DaemonConfig

# The exit code of a start that cannot work (the CLI's EXIT_CONFIG: fix the setup, then retry).
EXIT_CANNOT_START = 5
LOCK_NAME = ".edgemoe.lock"


class StartupError(Exception):
    """This node cannot start; the message is the one line to show."""


class DirClaim:
    """The exclusive lock of one directory, held until `release` (or the process ends)."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd: int | None = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the only descriptor drops the flock
            self._fd = None


def claim_dir(path: Path, what: str) -> DirClaim:
    """Create `path` if needed, check that it is writable and lock it for this process."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd = os.open(path / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    except OSError as exc:
        raise StartupError(f"{what} {path} is not usable: {exc.strerror or exc}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        holder = _read_pid(fd)
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            by = f" (pid {holder})" if holder else ""
            raise StartupError(
                f"{what} {path} is in use by another edgemoe daemon{by}; give each daemon its own"
            ) from None
        raise StartupError(f"{what} {path}: cannot lock: {exc.strerror or exc}") from None
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        probe = path / f".write-probe-{os.getpid()}"
        probe.write_bytes(b"")  # the lock file may predate a read-only remount or a chmod
        probe.unlink()
    except OSError as exc:
        os.close(fd)
        raise StartupError(f"{what} {path} is not writable: {exc.strerror or exc}") from None
    return DirClaim(path, fd)


def _read_pid(fd: int) -> str:
    try:
        text = os.pread(fd, 32, 0).decode(errors="replace").strip()
    except OSError:
        return ""
    return text if text.isdigit() else ""


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and "localhost"; a wildcard or any other address is not."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_exposure(config: DaemonConfig) -> None:
    """A node listening beyond loopback must have both an inference and an admin token."""
    if is_loopback(config.host):
        return
    missing = [k for k in ("api_token", "admin_token") if not getattr(config, k)]
    if missing:
        raise StartupError(
            f"host {config.host} listens beyond loopback but {' and '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} not set; set them (or their *_file keys) "
            "or bind 127.0.0.1"
        )
