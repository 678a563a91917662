"""Atomic replacement of a set of files in a folder that may hold other files (an adapter's
adapter_config.json + adapter_model.safetensors inside a training output folder with checkpoints,
README.md, ...), and consistent reading of that set.

A save (``write_files``), holding an exclusive flock on the folder:
  0. recovers what an interrupted save left (see ``recover``);
  1. writes each new file into a hidden staging folder inside the folder,
     ``.loracuda_save.<token>.tmp/<final name>`` (a writer's own temporaries land there too), and
     fsyncs it;
  2. writes the journal ``.loracuda_save.journal`` ({"token", "renames": [[temporary, final], ...]})
     to its own temporary, fsyncs it and renames it into place, then fsyncs the folder: from this
     instant the new set is the folder's content;
  3. renames each temporary over its final name, fsyncs the folder;
  4. deletes the journal, fsyncs the folder.
A kill before step 2's rename leaves the old files (and temporaries the next save deletes); a kill at
or after it leaves a journal under which the new set is read. At no instant does a reader see one
file of the old set beside one of the new.

A reader (``reading``), holding a shared flock (no write access needed), resolves each final name:
if a journal is present, a final name it lists is read from its staged file while that still exists
(the rename not yet done), else from the final name. The next save rolls such a journal forward.
The flock also serialises a reader against a live save in another process or thread; where the
filesystem has no flock the journal alone still guarantees old-or-new after a kill.
"""

import contextlib
import errno
import json
import os
import re
import secrets
import shutil
from typing import Callable, Iterator

try:
    import fcntl
except ImportError:  # no flock (Windows): the journal alone keeps kills safe
    fcntl = None

JOURNAL_NAME = ".loracuda_save.journal"
_STAGING = re.compile(r"\.loracuda_save\.[0-9a-f]+\.tmp")


def _staging_name(token: str) -> str:
    return f".loracuda_save.{token}.tmp"


def _temp_name(final: str, token: str) -> str:
    """Where a save with ``token`` stages ``final`` (relative to the folder)."""
    return f"{_staging_name(token)}/{final}"


def _is_leftover(name: str, finals) -> bool:
    """A staging folder or journal temporary of an interrupted save, or a temporary of the two-rename
    saves of earlier versions (``.<final>.<random>.tmp``)."""
    if _STAGING.fullmatch(name):
        return True
    for final in list(finals) + [JOURNAL_NAME.lstrip(".")]:
        if re.fullmatch(rf"\.{re.escape(final)}\.[A-Za-z0-9_]+\.tmp", name):
            return True
    return False


def _fsync_dir(fd: int) -> None:
    try:
        os.fsync(fd)
    except OSError as error:  # some filesystems refuse fsync on a folder; the renames are still atomic
        if error.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise


@contextlib.contextmanager
def _locked(folder: str, exclusive: bool) -> Iterator[int]:
    """An O_RDONLY descriptor of ``folder`` holding a flock on it (shared or exclusive) for the block."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except NotADirectoryError:
        raise NotADirectoryError(errno.ENOTDIR, f"loracuda: {folder!r} is not a folder", folder) from None
    except PermissionError:
        if exclusive:
            raise
        yield None  # a folder that can be searched but not listed: its files are read unlocked
        return
    try:
        try:
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        except OSError as error:  # no flock on this filesystem: the journal still makes kills safe
            if error.errno not in (errno.ENOLCK, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EINVAL):
                raise
        yield fd
    finally:
        os.close(fd)  # releases the flock


def _read_journal(folder: str, finals) -> dict:
    """{final name: temporary name} of a complete journal in ``folder``, {} if there is none. A journal
    that is not one this module wrote (unparseable, or naming other files) is ignored."""
    try:
        with open(os.path.join(folder, JOURNAL_NAME), encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError):
        return {}
    out = {}
    try:
        token = data["token"]
        if not isinstance(token, str) or not re.fullmatch(r"[0-9a-f]+", token):
            return {}
        for temp, final in data["renames"]:
            if final in finals and temp == _temp_name(final, token):
                out[final] = temp
    except (KeyError, TypeError, ValueError):
        return {}
    return out


def resolve(folder: str, finals) -> dict:
    """{final name: the path its current content is read from}: the temporary a complete journal
    lists while it still exists, the final name otherwise."""
    pending = _read_journal(folder, finals)
    out = {}
    for final in finals:
        temp = pending.get(final)
        if temp is not None and os.path.exists(os.path.join(folder, temp)):
            out[final] = os.path.join(folder, temp)
        else:
            out[final] = os.path.join(folder, final)
    return out


@contextlib.contextmanager
def reading(folder: str, finals) -> Iterator[dict]:
    """Within the block: {final name: path to read it from} (``resolve``), with a shared flock on the
    folder so that no save of this library changes the set while it is read."""
    with _locked(folder, exclusive=False):
        yield resolve(folder, finals)


def recover(folder: str, fd: int, finals) -> None:
    """Rolls a complete journal forward (renames its temporaries that still exist), deletes it, and
    deletes every temporary an interrupted save left. Needs the exclusive lock and write access."""
    pending = _read_journal(folder, finals)
    for final, temp in pending.items():
        if os.path.exists(os.path.join(folder, temp)):
            os.replace(os.path.join(folder, temp), os.path.join(folder, final))
    if pending:
        _fsync_dir(fd)
    if os.path.lexists(os.path.join(folder, JOURNAL_NAME)):
        os.unlink(os.path.join(folder, JOURNAL_NAME))
    for name in os.listdir(folder):
        if _is_leftover(name, finals):
            path = os.path.join(folder, name)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                os.unlink(path)
    _fsync_dir(fd)


def _fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_files(folder: str, writers: dict[str, Callable[[str], None]]) -> None:
    """Replaces the files named by ``writers``' keys in ``folder`` (created if needed) as one set:
    ``writers[name](path)`` writes the new content of ``name`` to ``path``. Other files of the folder
    are left alone. On an exception nothing of the folder's adapter files changes; after a kill the
    folder reads as the old set or the new (see the module docstring)."""
    folder = os.fspath(folder)
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise NotADirectoryError(errno.ENOTDIR, f"loracuda.save_adapter: {folder!r} exists and is not a folder", folder)
    os.makedirs(folder, exist_ok=True)
    finals = list(writers)
    for final in finals:  # a rename over a folder would fail after the commit point: refuse it first
        if os.path.isdir(os.path.join(folder, final)) and not os.path.islink(os.path.join(folder, final)):
            raise IsADirectoryError(
                errno.EISDIR, f"loracuda.save_adapter: {os.path.join(folder, final)!r} is a folder", os.path.join(folder, final)
            )
    with _locked(folder, exclusive=True) as fd:
        recover(folder, fd, finals)
        token = secrets.token_hex(8)
        temps = {final: _temp_name(final, token) for final in finals}
        staging = os.path.join(folder, _staging_name(token))
        journal_temp = os.path.join(folder, f"{JOURNAL_NAME}.{token}.tmp")
        try:
            os.mkdir(staging)
            for final, write in writers.items():
                path = os.path.join(folder, temps[final])
                write(path)
                _fsync_file(path)
            _fsync_file(staging)
            with open(journal_temp, "w", encoding="utf-8") as f:
                json.dump({"token": token, "renames": [[temps[n], n] for n in finals]}, f)
                f.flush()
                os.fsync(f.fileno())
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            with contextlib.suppress(OSError):
                os.unlink(journal_temp)
            raise
        # The commit point: once the journal is in place, the new set is what the folder holds.
        os.replace(journal_temp, os.path.join(folder, JOURNAL_NAME))
        _fsync_dir(fd)
        for final in finals:
            os.replace(os.path.join(folder, temps[final]), os.path.join(folder, final))
        _fsync_dir(fd)
        os.unlink(os.path.join(folder, JOURNAL_NAME))
        _fsync_dir(fd)
        shutil.rmtree(staging, ignore_errors=True)  # empty now, or holding a writer's stray temporaries
