"""The receiver app built inside each uvicorn worker process (``sync-project receiver --workers N``).

uvicorn starts N > 1 workers as fresh processes, so it needs an import string, not an app object:
``factory`` builds the app there from the options the command line put in ``OPTIONS_ENV`` (JSON
of :func:`~sync_project.receiver.app.create_app` keyword arguments). Each worker owns its store
(its own connection pool and group commit); nothing is shared between workers, and nothing needs
to be: deliveries are deduplicated by the database, so N processes, or N hosts behind a load
balancer, behave as one receiver.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import sys
from typing import Any

from starlette.applications import Starlette

OPTIONS_ENV = "SYNC_RECEIVER_APP_OPTIONS"
LOG_LEVEL_ENV = "SYNC_RECEIVER_LOG_LEVEL"
SWITCH_INTERVAL_S = 0.0005


def export_options(options: dict[str, Any], log_level: str) -> None:
    """Hand ``options`` to the worker processes uvicorn is about to start (they inherit the environment)."""
    os.environ[OPTIONS_ENV] = json.dumps(options)
    os.environ[LOG_LEVEL_ENV] = log_level


def factory() -> Starlette:
    """One worker's app: JSON logs, its own store (migrated by the app once the database answers)."""
    from sync_project.receiver.app import create_app
    from sync_project.receiver.logs import configure_json_logging
    from sync_project.store import Store

    listener = configure_json_logging(getattr(logging, os.environ.get(LOG_LEVEL_ENV, "info").upper()))
    atexit.register(listener.stop)
    # The same reason as the single-process command: the commit thread waits on the GIL after
    # every round trip, and the default switch interval would make it wait 5 ms each time.
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    store = Store(migrate_schema=False)
    atexit.register(store.close)
    return create_app(store, **json.loads(os.environ.get(OPTIONS_ENV) or "{}"))
