"""The cache folder of converted models and extracted corpora, and atomic writes into it."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path


def cache_root() -> Path:
    """Where converted models and extracted corpora live: $BLOCKSPARSE_CACHE or ~/.cache/blocksparse."""
    root = os.environ.get("BLOCKSPARSE_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "blocksparse"


@contextlib.contextmanager
def atomic_directory(final: Path):
    """Yield a temporary directory beside `final`; rename it to `final` only on success.

    An interrupted writer leaves no half-written `final` behind. If another process
    finished first, its result is kept and ours is discarded.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache is not a secret
    try:
        yield tmp
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
