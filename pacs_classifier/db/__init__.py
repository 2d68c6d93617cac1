"""Database access: models, engine and session handling, migrations, the audit chain."""
