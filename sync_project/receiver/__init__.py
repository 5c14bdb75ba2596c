"""The webhook receiver: an ASGI app that commits verified deliveries to the inbox before answering."""

from sync_project.receiver.app import DEFAULT_MAX_BODY_BYTES, create_app
from sync_project.receiver.routing import route

__all__ = ["DEFAULT_MAX_BODY_BYTES", "create_app", "route"]
