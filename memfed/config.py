"""Where memfed keeps its state on a user's machine.

``MEMFED_HOME`` (default ``~/.memfed``) holds node state such as the cube store; models built locally
live in the user's cache (see ``memfed.node.models``). Every command also takes explicit paths.
"""

from __future__ import annotations

import os
from pathlib import Path


def memfed_home() -> Path:
    """Root of memfed's persistent state."""
    return Path(os.environ.get("MEMFED_HOME") or Path.home() / ".memfed")


def default_store_dir() -> Path:
    """The local node's cube store."""
    return memfed_home() / "store"


def default_identity_dir() -> Path:
    """The local node's identity (signing and HPKE keys; see memfed.crypto.identity)."""
    return memfed_home() / "identity"
