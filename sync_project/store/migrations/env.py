"""Alembic environment.

Online (every ``Store`` open): runs on the connection, and inside the transaction, that migrate.py
opened. Offline (``command.upgrade(config, rev, sql=True)``): renders the DDL as a script for the
dialect named in ``config.attributes["dialect_name"]``, for DBAs who apply migrations by hand and
for the test fixtures of older schema versions.
"""

from alembic import context

config = context.config
if context.is_offline_mode():
    context.configure(dialect_name=config.attributes.get("dialect_name", "postgresql"), literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()
else:
    connection = config.attributes["connection"]
    context.configure(connection=connection, render_as_batch=connection.dialect.name == "sqlite")
    with context.begin_transaction():
        context.run_migrations()
