"""A real PostgreSQL server for tests: see ztnet.lab.postgres (the lab runs its replicas'
database with the same code)."""

from ztnet.lab.postgres import PostgresServer, available, pg_bin

__all__ = ["PostgresServer", "available", "pg_bin"]
