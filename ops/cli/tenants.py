"""``rilla-bridge tenants``: the tenants file."""

from __future__ import annotations

from dataclasses import replace

import click

from ops.cli import common, main
from rilla_bridge.clock import SystemClock
from rilla_bridge.operations import Operations
from rilla_bridge.settings import Settings
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


# -- delivery pause and webhook URLs (the console's tenant actions, same service layer) -------
def _tenant_operations(settings: Settings) -> Operations:
    from rilla_bridge.history.db import make_engine

    return Operations(settings, common.client(settings), make_engine(settings), SystemClock(),
                      common.tenants(settings))


@tenants.command("pause")
@click.argument("slug")
def tenants_pause(slug: str) -> None:
    """Stop delivering a tenant's events (webhooks keep arriving and wait durably)."""
    settings = common.settings()
    try:
        _tenant_operations(settings).pause(slug, common.actor())
    except LookupError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"{slug}: delivery paused (resume with `rilla-bridge tenants resume {slug}`)")


@tenants.command("resume")
@click.argument("slug")
def tenants_resume(slug: str) -> None:
    """Deliver a tenant's events again; what waited drains through its lanes."""
    settings = common.settings()
    try:
        went = _tenant_operations(settings).resume(slug, common.actor())
    except LookupError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"{slug}: delivery resumed ({went} event(s) dispatched at once)")


@tenants.command("urls")
@click.argument("slug", required=False)
@click.option("--base-url", help="this service's public address (default: PUBLIC_URL)")
@click.option("--show-token", is_flag=True,
              help="print the Callingly URL with its token (recorded in the audit log)")
def tenants_urls(slug: str | None, base_url: str | None, show_token: bool) -> None:
    """The webhook URLs to paste into CallRail and Callingly (the token masked)."""
    settings = common.settings()
    base = (base_url or settings.public_url).rstrip("/")
    if not base:
        raise click.ClickException("give --base-url https://<your-app> or set PUBLIC_URL")
    ops = _tenant_operations(settings)
    chosen = [slug] if slug else sorted(ops.tenants)
    for name in chosen:
        tenant = ops.tenants.get(name)
        if tenant is None:
            raise click.ClickException(f"no tenant {name} in {settings.tenants_file}")
        urls = ops.webhook_urls(tenant, base)
        if show_token and "callingly" in urls:
            urls["callingly"] = ops.callingly_url(name, base, common.actor())
        click.echo(f"{name}:")
        for source, url in urls.items():
            click.echo(f"  {source:<9} {url}")
        if not urls:
            click.echo("  (no [callrail] or [callingly] section)")
