"""The results database (SQLite, standard library): one row per run, one per epoch, one per site.

Each finished run is written in one transaction the moment it finishes, so a study that is
interrupted or killed loses at most the runs in flight and resumes by skipping finished ones.
"""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    study TEXT NOT NULL,
    protocol TEXT NOT NULL,
    config TEXT NOT NULL,
    status TEXT NOT NULL,
    result TEXT,
    error TEXT,
    seconds REAL,
    finished REAL
);
CREATE TABLE IF NOT EXISTS epochs (
    run_id TEXT NOT NULL REFERENCES runs(run_id),
    epoch INTEGER NOT NULL,
    train_loss REAL, train_acc REAL, test_loss REAL, test_acc REAL,
    kink_hits INTEGER, effective INTEGER, changed_steps INTEGER, steps INTEGER, seconds REAL,
    PRIMARY KEY (run_id, epoch)
);
CREATE TABLE IF NOT EXISTS sites (
    run_id TEXT NOT NULL REFERENCES runs(run_id),
    epoch INTEGER NOT NULL,
    site TEXT NOT NULL,
    evaluated INTEGER, hits INTEGER, effective INTEGER,
    PRIMARY KEY (run_id, epoch, site)
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
"""


class Store:
    def __init__(self, path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.path, timeout=30)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.executescript(SCHEMA)

    def close(self):
        self.db.close()

    def set_meta(self, key: str, value) -> None:
        with self.db:
            self.db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, json.dumps(value)))

    def meta(self, key: str, default=None):
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return default if row is None else json.loads(row[0])

    def finished_ids(self) -> set[str]:
        return {r[0] for r in self.db.execute("SELECT run_id FROM runs WHERE status = 'done'")}

    def save_run(self, run_id: str, study: str, protocol: str, config: dict, result: dict,
                 epochs: list[dict], sites: list[dict], seconds: float, status: str = "done",
                 error: str | None = None) -> None:
        """Write a finished run and its epoch and site rows in one transaction."""
        with self.db:
            self.db.execute("DELETE FROM epochs WHERE run_id = ?", (run_id,))
            self.db.execute("DELETE FROM sites WHERE run_id = ?", (run_id,))
            self.db.execute(
                "INSERT OR REPLACE INTO runs VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (run_id, study, protocol, json.dumps(config, sort_keys=True), status,
                 json.dumps(result), error, seconds, time.time()))
            self.db.executemany(
                "INSERT INTO epochs VALUES (:run_id, :epoch, :train_loss, :train_acc, :test_loss,"
                " :test_acc, :kink_hits, :effective, :changed_steps, :steps, :seconds)",
                [{"run_id": run_id, **{k: e.get(k) for k in (
                    "epoch", "train_loss", "train_acc", "test_loss", "test_acc", "kink_hits",
                    "effective", "changed_steps", "steps", "seconds")}} for e in epochs])
            self.db.executemany(
                "INSERT INTO sites VALUES (:run_id, :epoch, :site, :evaluated, :hits, :effective)",
                [{"run_id": run_id, **s} for s in sites])

    def runs(self, protocol: str | None = None, status: str = "done") -> list[dict]:
        q = "SELECT run_id, study, protocol, config, result, seconds FROM runs WHERE status = ?"
        args = [status]
        if protocol is not None:
            q += " AND protocol = ?"
            args.append(protocol)
        return [{"run_id": r[0], "study": r[1], "protocol": r[2], "config": json.loads(r[3]),
                 "result": json.loads(r[4]), "seconds": r[5]}
                for r in self.db.execute(q + " ORDER BY rowid", args)]

    def epochs(self, run_id: str) -> list[dict]:
        cur = self.db.execute("SELECT * FROM epochs WHERE run_id = ? ORDER BY epoch", (run_id,))
        names = [d[0] for d in cur.description]
        return [dict(zip(names, r)) for r in cur]

    def sites(self, run_id: str) -> list[dict]:
        cur = self.db.execute("SELECT * FROM sites WHERE run_id = ? ORDER BY epoch, site",
                              (run_id,))
        names = [d[0] for d in cur.description]
        return [dict(zip(names, r)) for r in cur]

    def count(self) -> dict[str, int]:
        return dict(self.db.execute("SELECT status, COUNT(*) FROM runs GROUP BY status"))
