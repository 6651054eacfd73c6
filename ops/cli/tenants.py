"""``rilla-bridge tenants``: the tenants file."""

from __future__ import annotations

import click

from ops.cli import common, main
from rilla_bridge.settings import ConfigError
from rilla_bridge.tenants import load_tenants, mask


@main.group()
def tenants() -> None:
    """The tenants file."""


@tenants.command("check")
@click.option("--file", "path", help="tenants file (default: TENANTS_FILE)")
def tenants_check(path: str | None) -> None:
    """Validate the tenants file and print a summary with every secret masked."""
    settings = common.settings()
    try:
        loaded = load_tenants(path or settings.tenants_file)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"{path or settings.tenants_file}: {len(loaded)} tenant(s) OK")
    for t in loaded.values():
        click.echo(f"- {t.slug}: rilla_api_key {mask(t.rilla_api_key)}, "
                   f"default_user_email {t.default_user_email or '-'}, "
                   f"deliver_unrecorded {str(t.deliver_unrecorded).lower()}, "
                   f"{len(t.users)} user mapping(s)")
        if t.callrail:
            api = (f"account {t.callrail.account_id}, api_key {mask(t.callrail.api_key)}"
                   if t.callrail.api_enabled else "no API access")
            click.echo(f"    callrail: signing_key {mask(t.callrail.signing_keys)}, {api}"
                       + (f", company {t.callrail.company_id}" if t.callrail.company_id else ""))
        if t.callingly:
            click.echo(f"    callingly: webhook_token {mask(t.callingly.webhook_tokens)}")
        if not t.callrail and not t.callingly:
            click.echo("    (no [callrail] or [callingly] section: its webhooks answer 404)")
