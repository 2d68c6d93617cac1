"""Reports: named SQL files shipped with the package, run on SQLite and PostgreSQL."""
