"""The bundled fake SaaS CRM ("sandbox"): contacts and deals over real HTTP, signed webhooks, chaos.

It stands in for HubSpot in the demo and in the end-to-end tests. In-process::

    with SandboxServer(SandboxConfig(webhook_url=...)) as server:
        admin = SandboxAdmin(server.base_url, server.admin_token)
        account_id, token = admin.create_account(contacts=20, deals=10)

From a shell: ``sync-project sandbox --help``.
"""

from sync_project.sandbox.chaos import ChaosSettings
from sync_project.sandbox.client import SandboxAdmin
from sync_project.sandbox.data import ChangeEvent, SandboxState
from sync_project.sandbox.fake import ChangeMix
from sync_project.sandbox.generator import GeneratorSettings
from sync_project.sandbox.ratelimit import RateLimitSettings
from sync_project.sandbox.server import SandboxServer, serve
from sync_project.sandbox.service import AccountSpec, Sandbox, SandboxConfig
from sync_project.sandbox.webhooks import DeliveryCounts, RetryPolicy

__all__ = [
    "AccountSpec",
    "ChangeEvent",
    "ChangeMix",
    "ChaosSettings",
    "DeliveryCounts",
    "GeneratorSettings",
    "RateLimitSettings",
    "RetryPolicy",
    "Sandbox",
    "SandboxAdmin",
    "SandboxConfig",
    "SandboxServer",
    "SandboxState",
    "serve",
]
