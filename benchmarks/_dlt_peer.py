"""What the benchmarks that set dlt beside sync_project share (``dlt_merge.py``, ``warehouse.py``).

dlt run in isolation from the machine's own dlt setup, its Postgres credentials, the issue's change
step (20 % updated, 1 % deleted), and the check that ends every load: a side's final state, read
back, at the expected versions. A fast wrong load is no figure, so both benchmarks stop on it.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

import sqlalchemy as sa

#: The change step of issues 8 and 21: this share of the records updated, this share deleted.
UPDATED_FRACTION = 0.20
DELETED_FRACTION = 0.01


@contextmanager
def isolated_dlt() -> Iterator[Path]:
    """dlt reads its settings from the environment: no telemetry, nothing written outside a
    temporary home (removed afterwards), warnings only."""
    with tempfile.TemporaryDirectory(prefix="dlt-home-") as home:
        os.environ["RUNTIME__DLTHUB_TELEMETRY"] = "false"
        os.environ["DLT_DATA_DIR"] = home
        os.environ.setdefault("RUNTIME__LOG_LEVEL", "WARNING")
        yield Path(home)


def dlt_credentials(database_url: str) -> str:
    """A libpq URL for dlt. dlt insists on a password; trust-auth servers ignore the placeholder."""
    url = sa.engine.make_url(database_url).set(drivername="postgresql")
    if not url.password:
        url = url.set(password=os.environ.get("PGPASSWORD") or "unused-with-trust-auth")
    return url.render_as_string(hide_password=False)


def check_versions(label: str, found: Mapping[str, datetime], expected: Mapping[str, datetime]) -> None:
    """Raises unless ``found`` (live id -> ``updated_at``, read back from a side) is ``expected``."""
    if found == expected:
        return
    missing = len(expected.keys() - found.keys())
    extra = len(found.keys() - expected.keys())
    wrong = sum(1 for key in expected.keys() & found.keys() if expected[key] != found[key])
    raise RuntimeError(f"{label}: {missing} records missing, {extra} that should be gone, {wrong} at the wrong version")
