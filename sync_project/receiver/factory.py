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
import gc
import json
import logging
import os
import sys
from typing import Any

from starlette.applications import Starlette

OPTIONS_ENV = "SYNC_RECEIVER_APP_OPTIONS"
LOG_LEVEL_ENV = "SYNC_RECEIVER_LOG_LEVEL"
#: The group commit's thread waits for the GIL after every database round trip; the default
#: 5 ms switch interval would let a saturated event loop hold it that long each time.
SWITCH_INTERVAL_S = 0.0005


def tune_serving_process() -> None:
    """Tune this process for serving deliveries; call it once the app is built, before serving.

    The GIL switch interval, see :data:`SWITCH_INTERVAL_S`. And ``gc.freeze()``: everything
    imported and built so far (the project, SQLAlchemy, pydantic schemas, the registry) lives as
    long as the process, yet every full collection of the cyclic GC walked all of it, 12-20 % of
    the receiver's CPU under load and the pauses that made its p99 latency 140-220 ms (46-61 ms
    frozen; issue 18's benchmark). Frozen objects are never collected, and never need to be.
    """
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    gc.collect()
    gc.freeze()


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
    store = Store(migrate_schema=False)
    atexit.register(store.close)
    app = create_app(store, **json.loads(os.environ.get(OPTIONS_ENV) or "{}"))
    tune_serving_process()
    return app
