"""Output files written whole or not at all, and output paths checked before the slow work that fills them.

``atomic_file`` / ``write_text_atomic`` are the one way perft writes a file atomically (results, reports, best.json,
the run's recipe.yaml, converted test sets); checkpoints are directories, written the same way by
``checkpoint.write_checkpoint``. A bad ``--json`` / ``--html`` / ``--out`` fails in one line before any model
loads, and an error or Ctrl-C never leaves a partial file.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from perft_cli.errors import PerftError


def check_output_parent(path: Path, what: str, fix: str) -> None:
    """Fail in one line now, not after the slow work, when no file or folder can be created at ``path``.

    The nearest existing folder above ``path`` must be a folder (not a file, as in ``afile.txt/res.json``) that this
    process may write in. ``what`` names the path in the message (``--json``), ``fix`` says what to do.
    """
    parent = Path(path).parent
    while not parent.exists() and parent != parent.parent:  # exists() is False below a file too
        parent = parent.parent
    if not parent.is_dir():
        raise PerftError(f"{what} {str(path)!r} cannot be created: {str(parent)!r} is a file, not a folder; {fix}")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PerftError(f"{what} {str(path)!r} cannot be written: no permission to write in {str(parent)!r}; {fix}")
    try:  # root may "access" what no one can write (/proc, a read-only mount): create a file to be sure
        fd, probe = tempfile.mkstemp(dir=parent, prefix=".perft-write-test-")
    except OSError as e:
        raise PerftError(
            f"{what} {str(path)!r} cannot be written in {str(parent)!r}: {e.strerror or e}; {fix}"
        ) from None
    os.close(fd)
    os.unlink(probe)


def check_output_file(path: Path, what: str, fix: str) -> None:
    """``check_output_parent``, and ``path`` itself must not be a folder (a file there is replaced)."""
    if Path(path).is_dir():
        raise PerftError(f"{what} {str(path)!r} is a folder; it names the file to write: {fix}")
    check_output_parent(path, what, fix)


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """A temporary path beside ``path``, renamed to ``path`` when the block ends normally and removed otherwise
    (an error or Ctrl-C): ``path`` is either written complete or left as it was. Missing folders are created.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    created = create_parents(path)
    done = False
    try:
        yield tmp
        try:
            os.replace(tmp, path)
        except OSError as e:
            raise PerftError(f"cannot write {str(path)!r}: {e.strerror}") from None
        done = True
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        if not done:
            remove_empty(created)


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` whole or not at all: a temporary file beside it, flushed to disk, then renamed.

    The one way perft writes a small file that must never be seen half-written (best.json, recipe.yaml, caches).
    """
    with atomic_file(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())


def create_parents(path: Path, fix: str = "") -> list[Path]:
    """Create the missing folders above ``path``; returns them, deepest first, for ``remove_empty`` on failure."""
    created, folder = [], Path(path).parent
    while not folder.exists() and folder != folder.parent:
        created.append(folder)
        folder = folder.parent
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        hint = f"; {fix}" if fix else ""
        raise PerftError(f"cannot create the folder {str(Path(path).parent)!r}: {e.strerror}{hint}") from None
    return created


def remove_empty(folders: list[Path]) -> None:
    """Remove the folders ``create_parents`` made, deepest first, where nothing else was written meanwhile."""
    for d in folders:
        with contextlib.suppress(OSError):
            d.rmdir()
