"""The run directory of a training: one process at a time (a lock), cleaned of what killed ones left behind.

Rank 0 takes an exclusive flock on run_dir/.lock for the whole train() call: a second training on the same --out
is refused while the first one lives, and the kernel releases the lock when its holder dies, however it dies
(no stale lock to delete by hand).
"""
from __future__ import annotations

import contextlib
import os

from fastonestep.config import ConfigError
from fastonestep.engine.checkpoint import is_atomic_temporary

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no advisory locks, runs are not protected
    fcntl = None

LOCK_FILE = ".lock"


class RunDirectoryInUse(ConfigError):
    """Another process is training in this run directory."""


class RunLock:
    """An exclusive, non-blocking flock on `run_dir`/.lock that holds this process's pid (for the message of a
    refused second one). flock locks belong to an open file description: another open() of the file, in this
    process or another, conflicts with it."""

    def __init__(self, run_dir: str):
        self.path = os.path.join(run_dir, LOCK_FILE)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        self.locked = False  # stays so where the file system has no flock (Lustre mounted without it)
        if fcntl is None:
            return
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self._holder()
            os.close(self.fd)
            raise RunDirectoryInUse(f"run directory '{run_dir}' is in use by another process (pid {holder}); "
                                    "wait for it to end, or use another --out") from None
        except OSError:  # ENOSYS / ENOLCK / EOPNOTSUPP: train unprotected rather than not at all
            return
        self.locked = True
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"{os.getpid()}\n".encode("ascii"), 0)

    def _holder(self) -> str:
        text = os.pread(self.fd, 32, 0).decode("ascii", "replace").strip()
        return text or "unknown"

    def release(self, remove: bool = False) -> None:
        """Unlocks (explicitly: a forked data-loader worker may still share the descriptor); `remove` deletes the
        lock file first."""
        if remove:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
        if self.locked:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)


def remove_stale_temporaries(run_dir: str) -> list[str]:
    """Deletes the atomic-write temporaries (checkpoint.atomic_path) under `run_dir`: with the lock held, none
    belongs to a live training, so they are what killed ones left. Returns their paths."""
    removed = []
    for root, _, files in os.walk(run_dir):
        for name in files:
            if is_atomic_temporary(name):
                path = os.path.join(root, name)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
                removed.append(path)
    return removed


def _holds_only_the_lock(run_dir: str) -> bool:
    try:
        return set(os.listdir(run_dir)) <= {LOCK_FILE}
    except OSError:
        return False


def _claim(run_dir: str, log) -> tuple[RunLock, bool]:
    """Rank 0's part: (the lock, whether this call created the directory)."""
    created = not os.path.isdir(run_dir)
    os.makedirs(run_dir, exist_ok=True)
    lock = RunLock(run_dir)
    if not lock.locked:
        log(f"warning: run directory '{run_dir}' cannot be locked (no flock on its file system): nothing stops a "
            "second training on it")
        return lock, created  # without the lock, a temporary may be another live process's
    try:
        remove_stale_temporaries(run_dir)
    except BaseException:
        lock.release()
        raise
    return lock, created


@contextlib.contextmanager
def claimed_run_dir(run_dir: str, backend, log=print):
    """For the duration of a train() call: rank 0 creates `run_dir` if needed, locks it and removes stale
    temporaries; every rank learns the outcome (one broadcast), so all ranks stop alike when it is refused. A
    call that fails leaves no directory behind if it created it and wrote nothing there."""
    lock, created, failure = None, False, None
    if backend.is_main:
        try:
            lock, created = _claim(run_dir, log)
        except Exception as e:  # noqa: BLE001 - sent to every rank, raised below
            failure = e
    failure = backend.broadcast_object(failure)
    if failure is not None:
        raise failure
    failed = True
    try:
        yield
        failed = False
    finally:
        if lock is not None:
            remove = failed and created and _holds_only_the_lock(run_dir)
            lock.release(remove=remove)
            if remove:
                with contextlib.suppress(OSError):
                    os.rmdir(run_dir)
