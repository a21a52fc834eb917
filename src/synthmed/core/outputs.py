"""The one output protocol: every command's output folder is checked the same way before any work.

Two kinds of output share it:
- resumable folders (`run`, `train controlnet`, downstream studies): `open_output(out, kind, resume)` refuses
  a folder that holds anything but an earlier run of the same kind, then marks it with RUN_MARKER;
- atomic outputs (`prepare`, `train backbone`, `generate`, `evaluate`): `check_output(out, kind)` before the
  work, then `atomic_dir(out)` (core.io) writes under a temporary name and renames when complete.
Around both, `guarded_output(out)` (taken by every CLI command that writes an --out) holds OUT.lock, one writer
per output, and removes what a refused command created.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
from pathlib import Path

from synthmed.core.io import RUN_MARKER, SynthmedError
from synthmed.core.progress import note


def output_kind(out: Path) -> str | None:
    """The kind recorded in an output folder's marker (None without one)."""
    marker = Path(out) / RUN_MARKER
    return marker.read_text().strip() if marker.is_file() else None


def check_output(out: Path, kind: str | None = None, resume: bool = False) -> None:
    """Refuse a file, or a folder that holds anything but (with `resume`) an earlier synthmed run of the same kind."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise SynthmedError(f"{out}: output path exists and is not a folder")
    if not (out.is_dir() and any(out.iterdir())):
        return
    found = output_kind(out)
    if found is not None and kind is not None and found != kind:
        raise SynthmedError(f"{out}: holds another kind of synthmed output ({found}), not {kind}")
    if resume and found is not None:
        return
    raise SynthmedError(f"{out}: output folder exists and is not empty (choose a new --out)")


def mark_output(out: Path, kind: str) -> None:
    """Create an output folder that a later run of the same kind may continue."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / RUN_MARKER).write_text(kind + "\n")


def open_output(out: Path, kind: str, resume: bool = True) -> Path:
    """A resumable output folder of `kind`: checked (`check_output`), then marked. Returns it."""
    out = Path(out)
    check_output(out, kind, resume)
    mark_output(out, kind)
    return out


def partial_of(out: Path) -> Path:
    """Where a resumable command keeps its work until it renames it to OUT."""
    out = Path(out)
    return out.with_name(out.name + ".partial")


def lock_of(out: Path) -> Path:
    """The lock file beside an output (not inside it, so OUT itself is what a clean run writes)."""
    out = Path(out)
    return out.with_name(out.name + ".lock")


def _is_main_process() -> bool:
    """Only the first process of a multi-process launch takes the lock and cleans up (the others share its output)."""
    return os.environ.get("RANK", "0") == "0"


class OutputLock:
    """One writer per output: an exclusive lock on OUT.lock holding the writer's pid.

    The OS releases a `flock` when its holder dies, so a lock file left by a killed process is free:
    it is taken over and `stale_pid` says whose it was. A held lock is a one-line error naming the holder,
    or, with `wait` (a line for the user), waited for.
    """

    def __init__(self, out: Path):
        self.out, self.path = Path(out), lock_of(out)
        self.fd: int | None = None
        self.stale_pid: str | None = None

    def acquire(self, wait: str | None = None) -> "OutputLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 64).decode(errors="replace").strip() or "another process"
                if wait is None:
                    os.close(fd)
                    raise SynthmedError(f"{self.out}: another synthmed command is writing it (pid {holder}, lock {self.path}); "
                                        "wait for it to finish or stop it") from None
                note(f"{wait} (pid {holder})")
                fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:  # not a file its last holder removed between our open and our lock
                break
            os.close(fd)
        self.stale_pid = os.read(fd, 64).decode(errors="replace").strip() or None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is None:
            return
        self.path.unlink(missing_ok=True)  # while still holding it: a waiting opener then sees a new inode
        os.close(self.fd)
        self.fd = None


@contextlib.contextmanager
def guarded_output(out: Path):
    """Hold OUT's lock while a command writes it; on a refusal (SynthmedError) remove what this command created.

    OUT and OUT.partial that existed before are kept (an earlier run's finished work); after a crash or an
    interrupt OUT.partial is kept too, and the next run of the same command continues from it. A stale lock
    taken over is a `note:` line.
    """
    out = Path(out)
    if not _is_main_process():
        yield
        return
    made = next((p for p in reversed([out, *out.parents]) if not p.exists()), None)  # the first folder the lock will create
    lock = OutputLock(out).acquire()
    if lock.stale_pid:
        note(f"took over the lock of pid {lock.stale_pid}, which is no longer running; its finished work is kept")
    before = {p: _state(p) for p in (out, partial_of(out))}
    try:
        yield
    except SynthmedError:
        for path, was in before.items():
            if was == "absent" and path.exists():
                _remove(path)
            elif was == "empty" and path.is_dir():
                for child in path.iterdir():
                    _remove(child)
        lock.release()  # first: the lock file sits in OUT's parent, which may be one of the folders to remove
        _remove_empty_parents(out.parent, made)
        raise
    finally:
        lock.release()


def _remove(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True) if path.is_dir() and not path.is_symlink() else path.unlink(missing_ok=True)


def _remove_empty_parents(folder: Path, made: Path | None) -> None:
    """Remove the folders above OUT that this command created (from OUT's parent up to `made`), if empty."""
    if made is None or not (folder == made or made in folder.parents):
        return
    for p in [folder, *folder.parents]:
        try:
            p.rmdir()
        except OSError:
            return
        if p == made:
            return


def _state(path: Path) -> str:
    if not path.exists():
        return "absent"
    return "empty" if path.is_dir() and not any(path.iterdir()) else "kept"


def kept_work(out: Path) -> Path | None:
    """The folder an interrupted or crashed command left its finished work in (None if nothing): OUT.partial,
    or a resumable OUT (marked, e.g. a run folder or a ControlNet's checkpoints)."""
    out = Path(out)
    if partial_of(out).is_dir():
        return partial_of(out)
    return out if output_kind(out) is not None else None
