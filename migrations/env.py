"""Alembic environment for pgqueue's own schema.

The schema name comes from ``config.attributes["pgqueue_schema"]`` (set by ``pgqueue migrate``)
or ``-x schema=…`` on the alembic command line; the version table lives inside that schema so
pgqueue never writes outside it and never collides with an application's own Alembic history.
"""

from alembic import context
from sqlalchemy import create_engine, pool

from pgqueue.migrate import current_schema, sqlalchemy_url

config = context.config
schema = current_schema()
connection = config.attributes.get("connection")


def _run(conn: object) -> None:
    context.configure(
        connection=conn,  # type: ignore[arg-type]
        version_table="alembic_version",
        version_table_schema=schema,
        transaction_per_migration=False,
    )
    conn.exec_driver_sql(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')  # type: ignore[attr-defined]
    with context.begin_transaction():
        context.run_migrations()


if connection is not None:
    _run(connection)
else:
    dsn = context.get_x_argument(as_dictionary=True).get("dsn") or config.get_main_option("sqlalchemy.url")
    if not dsn:
        raise SystemExit("pass the database with: alembic -x dsn=postgresql://... upgrade head")
    engine = create_engine(sqlalchemy_url(dsn), poolclass=pool.NullPool)
    with engine.begin() as conn:
        _run(conn)
