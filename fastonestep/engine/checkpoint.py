"""Atomic file writes and training checkpoints.

Every file is written to a temporary name in the same directory, flushed and fsynced, then renamed over
the target: a crash at any point leaves either the old file or the new one, never a torn one.

A checkpoint is torch.save's zip archive, in which every record (the pickle, each tensor's bytes) carries its
CRC-32, written with it in the same atomic write. torch.load does not check them; load_checkpoint does, so a file
damaged after it was written (flipped bytes, a truncation) is refused by name instead of resuming from garbage.
The file stays a plain torch.save file (torch.load reads it), and checkpoints of earlier versions are checked
alike.
"""
from __future__ import annotations

import contextlib
import glob
import io
import json
import os
import re
import tempfile
import zipfile
import zlib

import torch

CHECKPOINT_PATTERN = "checkpoint-{step:08d}.pt"
_CHECKPOINT_RE = re.compile(r"checkpoint-(\d{8})\.pt$")
TEMP_PREFIX = ".tmp-"
# atomic_path's temporaries: mkstemp's 8 random characters, then "-<target name>"
_TEMP_RE = re.compile(r"^" + re.escape(TEMP_PREFIX) + r"[a-z0-9_]{8}-.")


class CheckpointError(RuntimeError):
    """A checkpoint or exported model that cannot be read; the message names the file."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str):
    """Yields a temporary path next to `path`; on success it is fsynced and renamed over `path`."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix="-" + os.path.basename(path), dir=directory)
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; results should be as readable as any file
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def is_atomic_temporary(name: str) -> bool:
    """True for the name of an atomic_path temporary (one a killed process may have left behind)."""
    return bool(_TEMP_RE.match(name))


def atomic_write_bytes(path: str, data: bytes) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def atomic_write_text(path: str, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def atomic_torch_save(obj, path: str) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def _save_with_checksums(obj, path: str) -> None:
    """atomic_torch_save, with the CRC-32 of every record computed whatever torch's global switch says."""
    try:
        from torch.utils.serialization import config
    except ImportError:  # torch before the switch existed: always computed
        atomic_torch_save(obj, path)
        return
    saved = config.save.compute_crc32
    config.save.compute_crc32 = True
    try:
        atomic_torch_save(obj, path)
    finally:
        config.save.compute_crc32 = saved


def list_checkpoints(run_dir: str) -> list[tuple[int, str]]:
    found = []
    for path in glob.glob(os.path.join(run_dir, "checkpoint-*.pt")):
        m = _CHECKPOINT_RE.search(path)
        if m:
            found.append((int(m.group(1)), path))
    return sorted(found)


def latest_checkpoint(run_dir: str) -> str | None:
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def save_checkpoint(run_dir: str, step: int, state: dict, keep: int = 2) -> str:
    """Writes checkpoint `step` and keeps the newest `keep` up to it. Newer ones can only be damaged files the
    run resumed past (load_latest_checkpoint): they are removed, so the newest file is always the run's
    progress."""
    path = os.path.join(run_dir, CHECKPOINT_PATTERN.format(step=step))
    _save_with_checksums(state, path)
    found = list_checkpoints(run_dir)
    kept = [p for s, p in found if s <= step][-keep:]
    for _, old in found:
        if old not in kept:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(old)
    return path


def _verify_records(path: str) -> None:
    """Checks the CRC-32 of every record of torch.save's zip archive `path` (a file of torch's legacy format has
    none: nothing to check). A file saved with checksums turned off (every CRC 0) is let through."""
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as f:
            if f.read(4) == b"PK\x03\x04":  # a zip whose end (the record directory) is cut off
                raise CheckpointError(f"checkpoint '{path}' is damaged: truncated (its record directory is missing)")
        return
    try:
        with zipfile.ZipFile(path) as archive:
            if all(r.CRC == 0 for r in archive.infolist()):
                return
            bad = archive.testzip()  # reads every record to its end
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as e:
        raise CheckpointError(f"checkpoint '{path}' is damaged: {e}") from None
    if bad is not None:
        raise CheckpointError(f"checkpoint '{path}' is damaged: record '{bad}' fails its CRC-32 check (bytes "
                              "changed after it was written)")


def load_checkpoint(path: str) -> dict:
    try:
        _verify_records(path)
        return torch.load(path, map_location="cpu", weights_only=False)
    except CheckpointError:
        raise
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint '{path}' does not exist") from None
    except Exception as e:  # a truncated or foreign file
        raise CheckpointError(f"checkpoint '{path}' cannot be read: {e}") from None


def load_latest_checkpoint(run_dir: str, warn=print) -> tuple[str | None, dict | None]:
    """(path, state) of the newest checkpoint that reads and verifies, (None, None) when there is none. A newer
    damaged one (a disk fault; a kill cannot tear an atomic write) is skipped with a warning naming it: the run
    resumes from the one before (two are kept). Every checkpoint damaged: CheckpointError naming them."""
    damaged = []
    for _, path in reversed(list_checkpoints(run_dir)):
        try:
            state = load_checkpoint(path)
        except CheckpointError as e:
            damaged.append(str(e))
            continue
        for reason in damaged:
            warn(f"warning: {reason}; falling back to the older '{path}' (the next checkpoint saved removes the "
                 "damaged file)")
        return path, state
    if damaged:
        raise CheckpointError(f"no checkpoint in run directory '{run_dir}' can be read: {'; '.join(damaged)}; "
                              "delete them to start the run over from step 0, or use another --out")
    return None, None
