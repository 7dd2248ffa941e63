"""Atomic file writes and training checkpoints.

Every file is written to a temporary name in the same directory, flushed and fsynced, then renamed over
the target: a crash at any point leaves either the old file or the new one, never a torn one.
"""
from __future__ import annotations

import contextlib
import glob
import io
import json
import os
import re
import tempfile

import torch

CHECKPOINT_PATTERN = "checkpoint-{step:08d}.pt"
_CHECKPOINT_RE = re.compile(r"checkpoint-(\d{8})\.pt$")


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
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix="-" + os.path.basename(path), dir=directory)
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
    path = os.path.join(run_dir, CHECKPOINT_PATTERN.format(step=step))
    atomic_torch_save(state, path)
    for _, old in list_checkpoints(run_dir)[:-keep]:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(old)
    return path


def load_checkpoint(path: str) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint '{path}' does not exist") from None
    except Exception as e:  # a truncated or foreign file
        raise CheckpointError(f"checkpoint '{path}' cannot be read: {e}") from None
