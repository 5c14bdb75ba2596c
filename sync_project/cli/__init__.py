"""``sync-project``: the command line. Each command group lives in a module of this package."""

from __future__ import annotations

import importlib

import click

#: Modules whose ``command`` (a click command or group) is added to the root group.
COMMAND_MODULES = (
    "connections",
    "dev",
    "forwarder",
    "inbox",
    "leases",
    "receiver",
    "sandbox",
    "syncs",
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Real-time SaaS syncs on Dagster."""


for _name in COMMAND_MODULES:
    main.add_command(importlib.import_module(f"sync_project.cli.{_name}").command)
