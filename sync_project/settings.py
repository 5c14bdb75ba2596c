"""Where the project keeps its state, resolved from the environment in one place.

Every process (the Dagster webserver, daemon, run workers, the receiver, the CLI, tests) must agree on
the records database, so the URL is resolved here and nowhere else.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

DATABASE_URL_ENV = "SYNC_DATABASE_URL"
DATA_DIR_ENV = "SYNC_DATA_DIR"
#: The embedded default's Dagster instance config, copied into DAGSTER_HOME as dagster.yaml.
INSTANCE_TEMPLATE = Path(__file__).resolve().parent / "dagster_instance.yaml"


def project_root() -> Path:
    """The checkout that holds pyproject.toml (the package is installed editable from it)."""
    return Path(__file__).resolve().parent.parent


def data_dir() -> Path:
    """The git-ignored folder for the embedded default's files (SQLite databases, logs)."""
    path = Path(os.environ.get(DATA_DIR_ENV) or project_root() / "data")
    path.mkdir(parents=True, exist_ok=True)
    return path


def database_url() -> str:
    """The records/inbox database: ``SYNC_DATABASE_URL``, else a SQLite file in the data folder."""
    url = os.environ.get(DATABASE_URL_ENV)
    if url:
        return url
    return f"sqlite:///{data_dir() / 'sync.db'}"


def dagster_home() -> Path:
    """``DAGSTER_HOME``, defaulting to the project-local, git-ignored ``.dagster_home``.

    The instance config is copied there as ``dagster.yaml`` when missing, from
    ``sync_project/dagster_instance.yaml``, so the UI, the daemon, runs and the CLI all use one
    instance. The template is not called ``dagster.yaml``: ``dagster dev`` warns about a file of
    that name in its working directory (the project root) whenever DAGSTER_HOME is elsewhere.
    """
    home = Path(os.environ.get("DAGSTER_HOME") or project_root() / ".dagster_home")
    home.mkdir(parents=True, exist_ok=True)
    config = home / "dagster.yaml"
    if not config.exists():
        template = INSTANCE_TEMPLATE
        if template.exists():
            config.write_text(template.read_text())
    return home


# -- database faults: every wait has a deadline --------------------------------------------------

STATEMENT_TIMEOUT_ENV = "SYNC_DB_STATEMENT_TIMEOUT_S"
LOCK_TIMEOUT_ENV = "SYNC_DB_LOCK_TIMEOUT_S"
SESSION_OPTIONS_ENV = "SYNC_DB_SESSION_OPTIONS"
CONNECT_TIMEOUT_ENV = "SYNC_DB_CONNECT_TIMEOUT_S"
KEEPALIVES_IDLE_ENV = "SYNC_DB_KEEPALIVES_IDLE_S"
KEEPALIVES_INTERVAL_ENV = "SYNC_DB_KEEPALIVES_INTERVAL_S"
KEEPALIVES_COUNT_ENV = "SYNC_DB_KEEPALIVES_COUNT"
TCP_USER_TIMEOUT_ENV = "SYNC_DB_TCP_USER_TIMEOUT_S"
COMMIT_DEADLINE_ENV = "SYNC_RECEIVER_COMMIT_DEADLINE_S"

#: The receiver's default deadline for a delivery's commit (and for ``/healthz``'s probe).
DEFAULT_COMMIT_DEADLINE_S = 5.0


class DatabaseTimeouts(BaseModel):
    """How long a Postgres store connection may wait, and how it notices a dead peer.

    Waits that end the work they bound, so chosen above the longest legitimate one:

    - ``statement_timeout_s`` (5 min) bounds one statement. The longest legitimate ones are a
      full refresh's delete detection (one UPDATE over every live record of a connection: tens
      of seconds for a million rows on modest hardware) and a page of a streamed DataFrame read.
      Five minutes is ample headroom for those and still ends a runaway plan. Migrations run
      without it (they rebuild indexes over the whole table).
    - ``lock_timeout_s`` (2 min) bounds one wait for a lock. Writers of a (sync, connection) queue
      on its batch lock for as long as the holder's *transaction* lasts, not one statement: a
      webhook drain batch keeps its transaction open while handlers make HTTP calls to the
      provider, and a delete detection holds it for its whole UPDATE. Two minutes lets those
      finish and still ends a wait behind a session that will never commit (a client frozen
      mid-transaction, a forgotten ``psql``).
    - ``idle_in_transaction_session_timeout`` is deliberately not set: that same drain batch is
      "idle in transaction" while its handlers wait on HTTP, and it must not be killed for it.

    Dead peers, detected without ending live work:

    - libpq TCP keepalives (``keepalives_idle_s`` 30, ``keepalives_interval_s`` 10,
      ``keepalives_count`` 3) end an idle or waiting connection whose server vanished (host down,
      network cut) in about a minute instead of the kernel's two hours; a long statement is not
      affected, since the server's kernel answers the probes.
    - ``tcp_user_timeout_s`` (30) ends a connection whose sent data stays unacknowledged that
      long (the same faults, caught while writing).
    - The same four values are sent as the server's own ``tcp_keepalives_*``/``tcp_user_timeout``,
      so a session whose *client* died (a worker host crash mid-transaction) is ended and its
      locks released within about a minute too.
    - ``connect_timeout_s`` (10) bounds opening a connection.

    None of these fires when the server is frozen (a hung disk, SIGSTOP): its kernel still ACKs
    and the server never gets to run its timers. The receiver bounds that case itself, with its
    commit deadline.

    ``session_options`` (on) sends the timeouts and server keepalives as the startup parameter
    ``options``, merged with any ``options`` in the URL (which win for a setting they name). A
    pooler in transaction mode (pgbouncer) refuses unknown startup parameters: turn it off there
    (``SYNC_DB_SESSION_OPTIONS=off``) and set the same values on the role or database instead,
    e.g. ``ALTER ROLE sync SET statement_timeout = '5min'``; the libpq keepalives still apply.
    Zero turns a timeout off.
    """

    model_config = ConfigDict(frozen=True)

    statement_timeout_s: float = Field(default=300.0, ge=0)
    lock_timeout_s: float = Field(default=120.0, ge=0)
    session_options: bool = True
    connect_timeout_s: int = Field(default=10, ge=1)
    keepalives_idle_s: int = Field(default=30, ge=1)
    keepalives_interval_s: int = Field(default=10, ge=1)
    keepalives_count: int = Field(default=3, ge=1)
    tcp_user_timeout_s: float = Field(default=30.0, ge=0)


_TIMEOUT_FIELDS = {
    STATEMENT_TIMEOUT_ENV: "statement_timeout_s",
    LOCK_TIMEOUT_ENV: "lock_timeout_s",
    SESSION_OPTIONS_ENV: "session_options",
    CONNECT_TIMEOUT_ENV: "connect_timeout_s",
    KEEPALIVES_IDLE_ENV: "keepalives_idle_s",
    KEEPALIVES_INTERVAL_ENV: "keepalives_interval_s",
    KEEPALIVES_COUNT_ENV: "keepalives_count",
    TCP_USER_TIMEOUT_ENV: "tcp_user_timeout_s",
}


def database_timeouts() -> DatabaseTimeouts:
    """:class:`DatabaseTimeouts` from the ``SYNC_DB_*`` variables; unset ones keep the defaults."""
    given = {field: os.environ[env] for env, field in _TIMEOUT_FIELDS.items() if os.environ.get(env, "").strip()}
    try:
        return DatabaseTimeouts.model_validate(given)
    except ValidationError as error:
        problems = "; ".join(
            f"{_env_of(str(e['loc'][0]))}={given.get(str(e['loc'][0]))!r}: {e['msg']}" for e in error.errors()
        )
        raise ValueError(f"invalid database timeout setting: {problems}") from None


def _env_of(field: str) -> str:
    return next(env for env, name in _TIMEOUT_FIELDS.items() if name == field)


def commit_deadline_s() -> float:
    """The receiver's commit deadline: ``SYNC_RECEIVER_COMMIT_DEADLINE_S``, default 5 s."""
    raw = os.environ.get(COMMIT_DEADLINE_ENV, "").strip()
    if not raw:
        return DEFAULT_COMMIT_DEADLINE_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise ValueError(f"{COMMIT_DEADLINE_ENV}={raw!r}: expected a positive number of seconds")
    return value


INBOX_RETENTION_ENV = "SYNC_INBOX_RETENTION_DAYS"
#: Done events are kept this long by default: longer than providers redeliver (Stripe retries for
#: 3 days), so a late redelivery is still recognised as a duplicate.
DEFAULT_INBOX_RETENTION_DAYS = 7.0


def inbox_retention_days() -> float | None:
    """How long done events stay in the inbox: ``SYNC_INBOX_RETENTION_DAYS``, default 7; 0 keeps
    them for ever (None)."""
    raw = os.environ.get(INBOX_RETENTION_ENV, "").strip()
    if not raw:
        return DEFAULT_INBOX_RETENTION_DAYS
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if value < 0 or value != value or value == float("inf"):
        raise ValueError(f"{INBOX_RETENTION_ENV}={raw!r}: expected a number of days (0 keeps done events)")
    return value or None


# -- the warehouse (sync_project/warehouse/) -----------------------------------------------------

WAREHOUSE_DESTINATION_ENV = "SYNC_WAREHOUSE_DESTINATION"
WAREHOUSE_DATASET_ENV = "SYNC_WAREHOUSE_DATASET"
WAREHOUSE_DELETES_ENV = "SYNC_WAREHOUSE_DELETES"
WAREHOUSE_DUCKDB_MEMORY_LIMIT_ENV = "SYNC_WAREHOUSE_DUCKDB_MEMORY_LIMIT"
WAREHOUSE_DUCKDB_THREADS_ENV = "SYNC_WAREHOUSE_DUCKDB_THREADS"
#: DuckDB's ``memory_limit`` for the warehouse loads. With DuckDB's default (80 % of RAM) a load's
#: peak grew with its rows (394 MB at 100k, 670 MB at 500k); capped, DuckDB spills to
#: ``<file>.tmp`` instead, and the peak is the cap plus what is flat already (Python, dlt, pyarrow):
#: 404 / 429 / 436 MB at 100k / 500k / 1M with 128MB, 448 -> 550 MB from 100k to 1M with 256MB.
DEFAULT_WAREHOUSE_DUCKDB_MEMORY_LIMIT = "128MB"
#: The embedded default's dataset: a schema in the DuckDB file (not "warehouse", the file's own
#: catalog name, which DuckDB's binder would confuse with it).
DEFAULT_WAREHOUSE_DATASET = "synced"


def warehouse_destination() -> str:
    """The dlt destination the warehouse assets load into: ``SYNC_WAREHOUSE_DESTINATION``, default
    ``duckdb`` (the file ``data/warehouse.duckdb``). Any other dlt destination name (``postgres``,
    ``snowflake``, ``bigquery``, ...) takes its credentials from dlt's own configuration, e.g.
    ``DESTINATION__POSTGRES__CREDENTIALS`` or ``.dlt/secrets.toml``, never from this variable."""
    return os.environ.get(WAREHOUSE_DESTINATION_ENV, "").strip() or "duckdb"


def warehouse_duckdb_path() -> Path:
    """The embedded default warehouse: a DuckDB file in the data folder."""
    return data_dir() / "warehouse.duckdb"


def warehouse_dataset() -> str:
    """The dataset (schema) holding one table per sync: ``SYNC_WAREHOUSE_DATASET``, default ``synced``."""
    return os.environ.get(WAREHOUSE_DATASET_ENV, "").strip() or DEFAULT_WAREHOUSE_DATASET


def warehouse_deletes() -> str:
    """``soft`` (default: a deleted record keeps its row, ``_deleted_at`` set) or ``hard`` (the
    row is removed): ``SYNC_WAREHOUSE_DELETES``."""
    raw = os.environ.get(WAREHOUSE_DELETES_ENV, "").strip().lower() or "soft"
    if raw not in ("soft", "hard"):
        raise ValueError(f"{WAREHOUSE_DELETES_ENV}={raw!r}: expected soft or hard")
    return raw


def warehouse_duckdb_memory_limit() -> str | None:
    """DuckDB's ``memory_limit`` during a warehouse load (``SYNC_WAREHOUSE_DUCKDB_MEMORY_LIMIT``,
    a DuckDB size such as ``256MB`` or ``1GB``; default 128MB; ``none``: DuckDB's own default,
    80 % of the machine's memory). Only the DuckDB destination reads it. A merge DuckDB cannot
    spill fails with its ``Out of Memory Error``: raise the limit then."""
    raw = os.environ.get(WAREHOUSE_DUCKDB_MEMORY_LIMIT_ENV, "").strip()
    if not raw:
        return DEFAULT_WAREHOUSE_DUCKDB_MEMORY_LIMIT
    if raw.lower() == "none":
        return None
    if not re.fullmatch(r"\d+(\.\d+)?\s*(B|KB|MB|GB|TB|KIB|MIB|GIB|TIB)", raw, re.IGNORECASE):
        raise ValueError(f"{WAREHOUSE_DUCKDB_MEMORY_LIMIT_ENV}={raw!r}: expected a size such as 256MB or 1GB, or none")
    return raw


def warehouse_duckdb_threads() -> int | None:
    """DuckDB's ``threads`` during a warehouse load (``SYNC_WAREHOUSE_DUCKDB_THREADS``; default
    unset: DuckDB's own, one per core). Each thread buffers its own share of a merge."""
    raw = os.environ.get(WAREHOUSE_DUCKDB_THREADS_ENV, "").strip()
    if not raw:
        return None
    if not raw.isdigit() or int(raw) < 1:
        raise ValueError(f"{WAREHOUSE_DUCKDB_THREADS_ENV}={raw!r}: expected a whole number of threads, at least 1")
    return int(raw)
