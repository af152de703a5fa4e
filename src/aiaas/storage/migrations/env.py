"""Alembic environment: always run online, on the connection that `Database.migrate` passes."""

from alembic import context

from aiaas.storage.tables import metadata

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run migrations through aiaas.storage.db.Database.migrate()")

context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
