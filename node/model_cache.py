"""Where built models live, and building one exactly once even when several processes ask at once.

Layout: ``<models cache>/<name>/`` is a complete Hugging Face model directory; a build happens in a
temporary sibling ``.<name>.tmp-XXXX`` and is renamed into place only when finished, so a reader never
sees half a model. An exclusive ``fcntl`` lock on ``.<name>.lock`` serializes builders: the second
process waits, then finds the finished directory and reuses it. A crash leaves only a temp directory,
which the next builder removes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from memfed.errors import StorageError

log = logging.getLogger(__name__)

try:  # POSIX only. Elsewhere builds are still atomic (rename), just not serialized across processes.
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]


def models_cache_dir() -> Path:
    """``$MEMFED_CACHE_DIR``, else ``$XDG_CACHE_HOME/memfed/models``, else ``~/.cache/memfed/models``."""
    if os.environ.get("MEMFED_CACHE_DIR"):
        return Path(os.environ["MEMFED_CACHE_DIR"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "memfed" / "models"


def is_complete(path: Path, marker: str) -> bool:
    """A finished build: the directory holds ``config.json`` and the marker written last."""
    return (path / "config.json").is_file() and (path / marker).is_file()


@contextlib.contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    with lock_path.open("a") as f:
        if fcntl is not None:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)  # blocks while another process builds
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def ensure_built(target: Path, build: Callable[[Path], None], *, marker: str, rebuild: bool = False) -> Path:
    """Return ``target``, first running ``build(tmp_dir)`` and renaming it into place if needed.

    ``build`` receives an empty directory next to ``target`` and must write ``marker`` last.
    With ``rebuild=True`` an existing build is replaced (the old one is removed after the new one is in
    place, so a concurrent reader holding files open keeps working on Linux).
    """
    if not rebuild and is_complete(target, marker):
        return target
    root = target.parent
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StorageError(
            f"cannot create the model cache {root}: {exc}", hint="set MEMFED_CACHE_DIR"
        ) from exc
    with _exclusive(root / f".{target.name}.lock"):
        # Re-check under the lock: another process may have finished while we waited.
        if not rebuild and is_complete(target, marker):
            return target
        for stale in root.glob(f".{target.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)  # left by a crashed build; we hold the lock
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=root))
        try:
            log.info("building %s (once per recipe; later calls reuse it)", target)
            build(tmp)
            if not is_complete(tmp, marker):
                raise StorageError(f"model build into {tmp} did not complete (no {marker})")
            tmp.chmod(0o755)  # mkdtemp makes it 0700; a model directory is ordinary readable data
            old = None
            if target.exists():
                old = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-old-", dir=root))
                os.replace(target, old / "model")
            os.replace(tmp, target)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target
