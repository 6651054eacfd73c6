"""``rilla-bridge tenants``: the tenants file."""

from __future__ import annotations

from dataclasses import replace

import click

from ops.cli import common, main
from rilla_bridge.tenants import mask


@main.group()
def tenants() -> None:
    """The tenants file."""


@tenants.command("check")
@click.option("--file", "path", help="tenants file (default: TENANTS_FILE)")
def tenants_check(path: str | None) -> None:
    """Validate the tenants file (or TENANTS_TOML) and print a summary with every secret
    masked, then the configuration version each running process reports."""
    settings = common.settings()
    if path:
        settings = replace(settings, tenants_file=path, tenants_file_set=True, tenants_toml="")
    config = common.tenants_config(settings)
    loaded = config.tenants
    click.echo(f"{config.source}: {len(loaded)} tenant(s) OK, version {config.version}")
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
    common.print_process_versions(settings, config.version)
