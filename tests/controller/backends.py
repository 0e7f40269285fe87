"""The two Store backends for the contract tests: every test taking the ``backend`` or
``store`` fixture (tests/controller/conftest.py) runs on SQLite and on a real PostgreSQL
(a fresh database each: tests/conftest.py's ``postgres_server``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ztnet.controller.pgstore import PgStore
from ztnet.controller.store import SqliteStore, Store

TRUST_DOMAIN = "test.example"


@dataclass
class Backend:
    name: str
    open: Callable[[], Store]  # another instance on the same database
    integrity_error: type[Exception]
    _sql: Callable[[Store, str, tuple[Any, ...]], list[tuple[Any, ...]]]
    opened: list[Store] = field(default_factory=list)

    def store(self) -> Store:
        store = self.open()
        self.opened.append(store)
        return store

    def rows(self, store: Store, query: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """Raw SQL (``?`` placeholders) on ``store``'s database."""
        return self._sql(store, query, params)


def sqlite_rows(store: Store, query: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
    assert isinstance(store, SqliteStore)
    return store._db.execute(query, params).fetchall()


def pg_rows(store: Store, query: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
    assert isinstance(store, PgStore)
    with store._pool.connection() as conn:
        cursor = conn.execute(query.replace("?", "%s").encode(), params)
        return cursor.fetchall() if cursor.description else []
