"""Blind votes between base and LoRA images, in a SQLite file (one transaction per write)."""

from __future__ import annotations

import secrets
import sqlite3
import time
from contextlib import closing
from pathlib import Path

_SCHEMA = """
CREATE TABLE IF NOT EXISTS pairs (
    token TEXT PRIMARY KEY, lora TEXT NOT NULL, prompt TEXT NOT NULL, seed INTEGER NOT NULL,
    base_side TEXT NOT NULL CHECK (base_side IN ('left', 'right')), created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS votes (
    id INTEGER PRIMARY KEY AUTOINCREMENT, token TEXT UNIQUE NOT NULL, lora TEXT NOT NULL, prompt TEXT NOT NULL,
    seed INTEGER NOT NULL, winner TEXT NOT NULL CHECK (winner IN ('base', 'lora')), created REAL NOT NULL
);
"""


class VoteStore:
    """Pairs shown blind (which side holds the base image stays on the server) and the votes cast on them."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with closing(self._connect()) as db, db:
            db.executescript(_SCHEMA)

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=30)
        db.execute("PRAGMA journal_mode=WAL")
        return db

    def new_pair(self, lora: str, prompt: str, seed: int) -> tuple[str, str]:
        """Records a blind pair; returns (token, the side the base image is on)."""
        token, base_side = secrets.token_hex(16), secrets.choice(["left", "right"])
        with closing(self._connect()) as db, db:
            db.execute("INSERT INTO pairs VALUES (?, ?, ?, ?, ?, ?)", (token, lora, prompt, seed, base_side, time.time()))
        return token, base_side

    def vote(self, token: str, side: str) -> str:
        """Records a vote for ``side`` of pair ``token``; returns the winner ('base' or 'lora').

        Raises:
            ValueError: an unknown side or token, or a pair already voted on.
        """
        if side not in ("left", "right"):
            raise ValueError(f"vote for 'left' or 'right', not {side!r}")
        with closing(self._connect()) as db, db:
            row = db.execute("SELECT lora, prompt, seed, base_side FROM pairs WHERE token = ?", (token,)).fetchone()
            if row is None:
                raise ValueError("unknown or expired pair: generate a new one")
            lora, prompt, seed, base_side = row
            winner = "base" if side == base_side else "lora"
            try:
                db.execute("INSERT INTO votes (token, lora, prompt, seed, winner, created) VALUES (?, ?, ?, ?, ?, ?)",
                           (token, lora, prompt, seed, winner, time.time()))
            except sqlite3.IntegrityError as err:
                raise ValueError("this pair has already been voted on") from err
        return winner

    def win_rates(self) -> list[tuple[str, int, int]]:
        """(lora, LoRA wins, votes) for each LoRA with votes, most votes first."""
        with closing(self._connect()) as db:
            return db.execute(
                "SELECT lora, SUM(winner = 'lora'), COUNT(*) FROM votes GROUP BY lora ORDER BY COUNT(*) DESC, lora"
            ).fetchall()
