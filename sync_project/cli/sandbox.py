"""``sync-project sandbox``: serve the bundled fake CRM in the foreground until Ctrl-C."""

from __future__ import annotations

from pathlib import Path

import click
from pydantic import ValidationError

from sync_project.sandbox.chaos import ChaosSettings
from sync_project.sandbox.fake import ChangeMix
from sync_project.sandbox.generator import GeneratorSettings
from sync_project.sandbox.ratelimit import RateLimitSettings
from sync_project.sandbox.server import serve
from sync_project.sandbox.service import AccountSpec, Sandbox, SandboxConfig

SECRET_ENV = "SYNC_SANDBOX_WEBHOOK_SECRET"
ADMIN_TOKEN_ENV = "SYNC_SANDBOX_ADMIN_TOKEN"


@click.command("sandbox")
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to listen on.")
@click.option("--port", default=8765, show_default=True, type=click.IntRange(0, 65535), help="0 picks a free port.")
@click.option("--webhook-url", default=None, help="Where to POST webhooks (e.g. the receiver's sandbox route).")
@click.option(
    "--secret",
    envvar=SECRET_ENV,
    default=None,
    show_envvar=True,
    help="Webhook signing secret (whsec_...); generated and printed when not given.",
)
@click.option(
    "--admin-token",
    envvar=ADMIN_TOKEN_ENV,
    default=None,
    show_envvar=True,
    help="Bearer token of the /admin endpoints; generated and printed when not given.",
)
@click.option(
    "--accounts", default=2, show_default=True, type=click.IntRange(0, 100), help="Accounts acct-1..acct-N to create."
)
@click.option(
    "--contacts",
    default=20,
    show_default=True,
    type=click.IntRange(0, 100_000),
    help="Contacts each account starts with.",
)
@click.option(
    "--deals", default=10, show_default=True, type=click.IntRange(0, 100_000), help="Deals each account starts with."
)
@click.option("--seed", default=0, show_default=True, help="Seeds the generated data and the chaos decisions.")
@click.option(
    "--generator-rate",
    default=0.0,
    show_default=True,
    type=click.FloatRange(0, 1000),
    help="Changes per second by the change generator; 0 leaves it off (toggle via /admin/generator).",
)
@click.option(
    "--mix",
    default="3:6:1",
    show_default=True,
    callback=lambda _c, _p, v: _parse_mix(v),
    help="Relative weights create:update:delete of generated changes.",
)
@click.option(
    "--rate-limit",
    default=10.0,
    show_default=True,
    type=click.FloatRange(0),
    help="API requests per second per token; 0 disables rate limiting.",
)
@click.option("--burst", default=20, show_default=True, type=click.IntRange(1), help="Requests per token in a burst.")
@click.option(
    "--drop-pct", default=0.0, show_default=True, type=click.FloatRange(0, 100), help="Webhooks never delivered."
)
@click.option(
    "--duplicate-pct", default=0.0, show_default=True, type=click.FloatRange(0, 100), help="Webhooks delivered twice."
)
@click.option(
    "--delay-s",
    default=0.0,
    show_default=True,
    type=click.FloatRange(0, 3600),
    help="Hold each webhook up to this long, so they arrive reordered.",
)
@click.option(
    "--data",
    "data_path",
    default=None,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Keep accounts and records in this SQLite file across restarts (default: in memory). "
    "Accounts it already holds keep their data and get a new API token.",
)
@click.option(
    "--log-level", default="info", show_default=True, type=click.Choice(["debug", "info", "warning", "error"])
)
def command(
    host: str,
    port: int,
    webhook_url: str | None,
    secret: str | None,
    admin_token: str | None,
    accounts: int,
    contacts: int,
    deals: int,
    seed: int,
    generator_rate: float,
    mix: ChangeMix,
    rate_limit: float,
    burst: int,
    drop_pct: float,
    duplicate_pct: float,
    delay_s: float,
    data_path: Path | None,
    log_level: str,
) -> None:
    """Serve the sandbox CRM (contacts, deals, signed webhooks, chaos knobs) over HTTP."""
    try:
        config = SandboxConfig(
            seed=seed,
            webhook_url=webhook_url,
            webhook_secret=secret,
            admin_token=admin_token,
            accounts=[
                AccountSpec(account_id=f"acct-{n}", contacts=contacts, deals=deals) for n in range(1, accounts + 1)
            ],
            rate_limit=RateLimitSettings(enabled=rate_limit > 0, rate_per_s=rate_limit or 1.0, burst=burst),
            chaos=ChaosSettings(drop_pct=drop_pct, duplicate_pct=duplicate_pct, delay_s=delay_s),
            generator=GeneratorSettings(running=generator_rate > 0, rate_per_s=generator_rate or 1.0, mix=mix),
            data_path=data_path,
        )

        def ready(sandbox: Sandbox, base_url: str) -> None:
            _banner(sandbox, base_url, secret_given=secret is not None, admin_given=admin_token is not None)

        try:
            serve(config, host=host, port=port, log_level=log_level, on_ready=ready)
        except KeyboardInterrupt:
            # uvicorn re-raises Ctrl-C after its graceful shutdown, but the re-raised signal lands in
            # asyncio.run's own SIGINT handler, which only cancels the server's task: when that task
            # finishes first, serve() returns normally. Either way the sandbox has stopped.
            pass
    except (ValueError, OSError) as error:
        raise click.ClickException(str(error)) from error
    click.echo("sandbox stopped")


def _parse_mix(text: str) -> ChangeMix:
    try:
        create, update, delete = (float(part) for part in text.split(":"))
        return ChangeMix(create=create, update=update, delete=delete)
    except (ValueError, ValidationError) as error:
        detail = error.errors()[0]["msg"] if isinstance(error, ValidationError) else "expected three numbers"
        raise click.BadParameter(f"{text!r}: {detail}, as create:update:delete (e.g. 3:6:1)") from None


def _banner(sandbox: Sandbox, base_url: str, *, secret_given: bool, admin_given: bool) -> None:
    # Generated credentials are printed once, because nothing else can tell them to the person
    # starting a throwaway sandbox; credentials passed in are never echoed.
    secret = f"(from --secret/{SECRET_ENV})" if secret_given else sandbox.webhook_secret
    admin = f"(from --admin-token/{ADMIN_TOKEN_ENV})" if admin_given else sandbox.admin_token
    lines = [f"sandbox listening on {base_url}"]
    if sandbox.journal is None:
        lines.append("  data: in memory (gone when it stops; --data FILE keeps it)")
    elif sandbox.restored_accounts:
        lines.append(f"  data: {sandbox.journal.path}, kept from the last run: {', '.join(sandbox.restored_accounts)}")
    else:
        lines.append(f"  data: {sandbox.journal.path} (new)")
    lines += [f"  account {account_id}: API token {token}" for account_id, token in sandbox.accounts.items()]
    lines += [
        f"  webhooks -> {sandbox.deliveries.url or '(none: pass --webhook-url or POST /admin/webhook)'}",
        f"  webhook secret: {secret}",
        f"  admin token: {admin}",
        "Ctrl-C to stop.",
    ]
    click.echo("\n".join(lines))
