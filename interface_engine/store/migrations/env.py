"""Alembic environment: the store hands over an open connection, so no URL lives here."""

from alembic import context

from interface_engine.store.schema import metadata

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=metadata,
                  render_as_batch=connection.dialect.name == "sqlite")
with context.begin_transaction():
    context.run_migrations()
