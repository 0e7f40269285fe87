"""Shared controller for the process-level tests of one module: starting one
costs about a second, so tests that only need "a running controller" share
it and assert on versions relative to what they read first. And the Store
backends: ``backend``/``store`` run a test on SQLite and on PostgreSQL."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.controller.backends import TRUST_DOMAIN, Backend, pg_rows, sqlite_rows
from ztnet.controller.pgstore import PgStore
from ztnet.controller.store import SqliteStore, Store
from ztnet.testing.controller import (
    ControllerProcess,
    ControllerState,
    init_controller,
    write_policy,
)

BASE_POLICY = {"bot": [("10.0.0.1", "443"), ("10.0.0.2", "80")], "other": [("10.9.0.0/16", "22")]}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("controller")


@pytest.fixture(scope="module")
def state(workdir: Path) -> ControllerState:
    return init_controller(workdir / "state")


@pytest.fixture(scope="module")
def controller(state: ControllerState, workdir: Path) -> Iterator[ControllerProcess]:
    policy = write_policy(workdir, BASE_POLICY)
    with ControllerProcess(state, policy=policy) as process:
        yield process
    assert process.stop() == 0, process.log()


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    if request.param == "sqlite":
        path = tmp_path / "ztnet.db"
        SqliteStore.create(path, TRUST_DOMAIN).close()
        chosen = Backend("sqlite", lambda: SqliteStore.open(path), sqlite3.IntegrityError,
                         sqlite_rows)
    else:
        import psycopg

        server = request.getfixturevalue("postgres_server")
        url = server.create_database()
        PgStore.open(url, trust_domain=TRUST_DOMAIN).close()
        chosen = Backend("postgres", lambda: PgStore.open(url), psycopg.IntegrityError,
                         pg_rows)
    try:
        yield chosen
    finally:
        for store in chosen.opened:
            store.close()


@pytest.fixture
def store(backend: Backend) -> Store:
    return backend.store()
