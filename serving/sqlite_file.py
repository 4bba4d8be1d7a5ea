"""One SQLite file in WAL mode with one connection per thread: what the user-state store and the realtime action
store both are underneath.

WAL lets readers (request threads) go on while one writer commits; SQLite connections must not cross threads, and
the service answers from several, so each thread opens its own, lazily.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Literal


class WalFile:
    """``path`` opened (made if missing, ``schema`` applied) in WAL mode; ``connection()`` is this thread's.

    ``synchronous``: FULL fsyncs the WAL at each commit (a committed write survives power loss); NORMAL only at
    checkpoints (it survives a killed process, not a power cut). ``autocommit``: statements run outside implicit
    transactions (the caller writes BEGIN/COMMIT itself). A file that cannot be opened raises ``error`` naming
    ``what`` and the path.
    """

    def __init__(self, path: str | Path, schema: Sequence[str], *, what: str, error: type[Exception],
                 synchronous: Literal["FULL", "NORMAL"], autocommit: bool, timeout_s: float = 30.0):
        self.path, self.timeout_s = Path(path), timeout_s
        self.synchronous, self.autocommit = synchronous, autocommit
        self._local = threading.local()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            con = self.connection()
            con.execute("PRAGMA journal_mode=WAL")
            for stmt in schema:
                con.execute(stmt)
            con.commit()
        except (OSError, sqlite3.Error) as exc:
            raise error(f"{what} {self.path} cannot be opened: {exc}") from exc

    def connection(self) -> sqlite3.Connection:
        con = getattr(self._local, "con", None)
        if con is None:
            con = sqlite3.connect(self.path, timeout=self.timeout_s,
                                  **({"isolation_level": None} if self.autocommit else {}))
            con.execute(f"PRAGMA synchronous={self.synchronous}")
            self._local.con = con
        return con

    def close(self) -> None:
        """Close this thread's connection (others close with their threads)."""
        con = getattr(self._local, "con", None)
        if con is not None:
            con.close()
            self._local.con = None
