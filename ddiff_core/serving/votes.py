"""Blind votes between base and LoRA images, in a SQLite file (one transaction per write).

A pair is drawn by the server (its seed too), expires after a few minutes and takes one vote; a client casts a
bounded number of votes per hour. Clients are stored as a keyed hash of their address, never the address.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import secrets
import sqlite3
import time
from contextlib import closing
from pathlib import Path

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS pairs (
    token TEXT PRIMARY KEY, lora TEXT NOT NULL, prompt TEXT NOT NULL, seed INTEGER NOT NULL,
    base_side TEXT NOT NULL CHECK (base_side IN ('left', 'right')), created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS votes (
    id INTEGER PRIMARY KEY AUTOINCREMENT, token TEXT UNIQUE NOT NULL, lora TEXT NOT NULL, prompt TEXT NOT NULL,
    seed INTEGER NOT NULL, winner TEXT NOT NULL CHECK (winner IN ('base', 'lora')), created REAL NOT NULL
);
"""
_CLIENT_COLUMNS = ("pairs", "votes")  # columns added in schema 2


def wilson_interval(wins: int, total: int, z: float = 1.96) -> tuple[float, float]:
    """The 95% Wilson score interval of a win rate (sound for small counts, unlike p +- 1.96 sd)."""
    if total == 0:
        return 0.0, 1.0
    p = wins / total
    centre = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    return max(0.0, centre - half), min(1.0, centre + half)


class VoteStore:
    """Pairs shown blind (which side holds the base image, and the seed, stay on the server) and their votes."""

    def __init__(self, path: str | Path, *, pair_ttl_s: float = 600.0, votes_per_hour: int = 30):
        self.path = Path(path)
        self.pair_ttl_s, self.votes_per_hour = pair_ttl_s, votes_per_hour
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with closing(self._connect()) as db, db:
            db.executescript(_SCHEMA)
            if db.execute("PRAGMA user_version").fetchone()[0] < 2:
                for table in _CLIENT_COLUMNS:
                    columns = [row[1] for row in db.execute(f"PRAGMA table_info({table})")]
                    if "client" not in columns:
                        db.execute(f"ALTER TABLE {table} ADD COLUMN client TEXT NOT NULL DEFAULT ''")
                db.execute("PRAGMA user_version = 2")
            db.execute("INSERT OR IGNORE INTO meta VALUES ('client_key', ?)", (secrets.token_hex(32),))
            self._key = bytes.fromhex(db.execute("SELECT value FROM meta WHERE key = 'client_key'").fetchone()[0])

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=30)
        db.execute("PRAGMA journal_mode=WAL")
        return db

    def _client(self, client: str) -> str:
        return hmac.new(self._key, str(client).encode(), hashlib.sha256).hexdigest()[:32]

    def new_pair(self, lora: str, prompt: str, client: str = "") -> tuple[str, str, int]:
        """Records a blind pair; returns (token, the side the base image is on, the seed the server drew)."""
        token, base_side, seed = secrets.token_hex(16), secrets.choice(["left", "right"]), secrets.randbelow(2**32)
        now = time.time()
        with closing(self._connect()) as db, db:
            # Expired pairs nobody voted on go: the table stays as small as the traffic of the last minutes.
            db.execute("DELETE FROM pairs WHERE created < ? AND token NOT IN (SELECT token FROM votes)",
                       (now - self.pair_ttl_s,))
            db.execute("INSERT INTO pairs (token, lora, prompt, seed, base_side, created, client) VALUES (?, ?, ?, ?, ?, ?, ?)",
                       (token, lora, prompt, seed, base_side, now, self._client(client)))
        return token, base_side, seed

    def vote(self, token: str, side: str, client: str = "") -> str:
        """Records a vote for ``side`` of pair ``token``; returns the winner ('base' or 'lora').

        Raises:
            ValueError: an unknown side or token, an expired pair, a pair already voted on, or a client over its
                hourly number of votes.
        """
        if side not in ("left", "right"):
            raise ValueError(f"vote for 'left' or 'right', not {str(side)[:20]!r}")
        now, who = time.time(), self._client(client)
        with closing(self._connect()) as db, db:
            db.execute("BEGIN IMMEDIATE")  # the limit check and the vote are one write: concurrent votes queue up
            row = db.execute("SELECT lora, prompt, seed, base_side, created, client FROM pairs WHERE token = ?",
                             (str(token),)).fetchone()
            if row is None:
                raise ValueError("unknown or expired pair: generate a new one")
            lora, prompt, seed, base_side, created, shown_to = row
            if created < now - self.pair_ttl_s:
                raise ValueError("this pair has expired: generate a new one")
            if shown_to != who:
                raise ValueError("this pair was shown to another client: generate your own")
            recent = db.execute("SELECT COUNT(*) FROM votes WHERE client = ? AND created > ?",
                                (who, now - 3600)).fetchone()[0]
            if recent >= self.votes_per_hour:
                raise ValueError(f"vote limit reached ({self.votes_per_hour} an hour); thank you, try again later")
            winner = "base" if side == base_side else "lora"
            try:
                db.execute("INSERT INTO votes (token, lora, prompt, seed, winner, created, client) "
                           "VALUES (?, ?, ?, ?, ?, ?, ?)", (token, lora, prompt, seed, winner, now, who))
            except sqlite3.IntegrityError as err:
                raise ValueError("this pair has already been voted on") from err
        return winner

    def results(self) -> list[tuple[str, int, int, float, float]]:
        """(lora, LoRA wins, votes, 95% interval low, high) for each LoRA with votes, most votes first."""
        with closing(self._connect()) as db:
            rows = db.execute("SELECT lora, SUM(winner = 'lora'), COUNT(*) FROM votes GROUP BY lora "
                              "ORDER BY COUNT(*) DESC, lora").fetchall()
        return [(lora, wins, votes, *wilson_interval(wins, votes)) for lora, wins, votes in rows]
