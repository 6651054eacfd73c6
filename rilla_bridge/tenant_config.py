"""Where the tenants configuration comes from, which version each process runs, and reloading a
changed tenants file without a restart.

- Source: ``TENANTS_TOML`` (the file's content, for platforms without a disk) wins over
  ``TENANTS_FILE`` (SPEC). Both set to different content is an error (which one is meant?);
  neither set and no ``tenants.toml`` is an error naming both.
- Version: the first 12 hex digits of the SHA-256 of the configuration's text. The same text
  is the same version in every process and in the command line.
- ``LiveTenants`` is the mapping every component of a process reads (intake, lanes, the
  pipeline, the history writer); a reload replaces its whole configuration in one reference
  assignment, so no reader ever sees half of an old and half of a new file.
- ``TenantsReloader`` re-reads the file every few seconds; a change is parsed and validated
  whole first; a bad one is refused (logged once with the reason, the old configuration kept).
  Each process also writes what it runs (process type, host, pid, version) to the Redis hash
  ``rb:config:processes`` (``keys.CONFIG_PROCESSES``), heartbeat-stamped, for
  ``rilla-bridge tenants check`` and the warning before ``dlq replay``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import socket
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import redis

from rilla_bridge import keys
from rilla_bridge.clock import Clock
from rilla_bridge.observability import register_secrets
from rilla_bridge.settings import ConfigError, Settings
from rilla_bridge.tenants import Tenant, parse_tenants

log = logging.getLogger("rilla_bridge.config")

RELOAD_EVERY_SECONDS = 5.0     # a change is running everywhere well within 30 s
REPORT_STALE_SECONDS = 30.0    # a process silent this long is gone (its entry is dropped)
FROM_ENV = "TENANTS_TOML"


def version_of(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]


def read_text(settings: Settings) -> tuple[str, str]:
    """The configuration's text and where it came from (``TENANTS_TOML`` or the file path)."""
    if settings.tenants_toml.strip():
        if settings.tenants_file_set:
            try:
                with open(settings.tenants_file, encoding="utf-8") as fh:
                    on_disk: str | None = fh.read()
            except OSError:
                on_disk = None
            if on_disk != settings.tenants_toml:
                raise ConfigError(
                    f"both TENANTS_TOML and TENANTS_FILE ({settings.tenants_file}) are set and "
                    "they differ: unset one (TENANTS_TOML wins when they agree)")
        return settings.tenants_toml, FROM_ENV
    try:
        with open(settings.tenants_file, encoding="utf-8") as fh:
            return fh.read(), settings.tenants_file
    except FileNotFoundError:
        if settings.tenants_file_set:
            raise ConfigError(f"tenants file {settings.tenants_file!r} not found "
                              "(TENANTS_FILE)") from None
        raise ConfigError(f"no tenants configuration: set TENANTS_FILE (a TOML file) or "
                          f"TENANTS_TOML (its content); {settings.tenants_file!r} in the "
                          "working directory does not exist") from None
    except OSError as exc:
        raise ConfigError(f"cannot read tenants file {settings.tenants_file!r}: "
                          f"{exc.strerror}") from None


@dataclass(frozen=True)
class TenantsConfig:
    """One whole, validated configuration."""

    tenants: Mapping[str, Tenant]
    version: str
    source: str   # TENANTS_TOML, or the file's path


def load_config(settings: Settings, env: Mapping[str, str] | None = None) -> TenantsConfig:
    """The configuration as the settings name it; ``ConfigError`` with one clear message."""
    text, source = read_text(settings)
    return TenantsConfig(parse_tenants(text, env), version_of(text), source)


class LiveTenants(Mapping[str, Tenant]):
    """The tenants a process runs with. Read like a dict; ``swap`` replaces the whole
    configuration at once (one reference assignment: readers see the old or the new)."""

    def __init__(self, config: TenantsConfig) -> None:
        self._config = config

    @property
    def config(self) -> TenantsConfig:
        return self._config

    @property
    def version(self) -> str:
        return self._config.version

    def swap(self, config: TenantsConfig) -> None:
        self._config = config

    def __getitem__(self, slug: str) -> Tenant:
        return self._config.tenants[slug]

    def __iter__(self) -> Iterator[str]:
        return iter(self._config.tenants)

    def __len__(self) -> int:
        return len(self._config.tenants)


def live_tenants(settings: Settings) -> LiveTenants:
    """A process's tenants at start (a bad configuration stops the start: ConfigError)."""
    config = load_config(settings)
    register_secrets(s for t in config.tenants.values() for s in t.secrets())
    return LiveTenants(config)


class TenantsReloader:
    """Keeps ``live`` equal to the tenants file, and reports the version this process runs.

    ``poll`` is one check (tests call it with a FakeClock); ``start`` runs ``tick`` every
    ``every`` seconds on a daemon thread (a greenlet in the gevent workers)."""

    def __init__(self, settings: Settings, live: LiveTenants, clock: Clock, *,
                 client: redis.Redis | None = None, process: str = "process",
                 every: float = RELOAD_EVERY_SECONDS,
                 env: Mapping[str, str] | None = None) -> None:
        self.settings = settings
        self.live = live
        self.clock = clock
        self.client = client
        self.process = process
        self.every = every
        self.env = env
        self.refused: tuple[str, str] | None = None   # (version, reason) of a refused change
        self._seen: str | None = None   # a new version read once: applied when read again
        self.member = f"{process}@{socket.gethostname()}:{os.getpid()}"
        self._thread: threading.Thread | None = None

    def poll(self) -> str:
        """Reload if the file changed and stayed so for one check: ``unchanged``,
        ``settling`` (changed; read again at the next check), ``reloaded`` or ``refused``."""
        if self.live.config.source == FROM_ENV:
            return "unchanged"   # the environment changes only with a restart
        try:
            with open(self.live.config.source, encoding="utf-8") as fh:
                text = fh.read()
        except OSError as exc:
            return self._refuse("?", f"cannot read {self.live.config.source}: {exc.strerror}")
        version = version_of(text)
        if version == self.live.version:
            self.refused = self._seen = None
            return "unchanged"
        if self.refused and self.refused[0] == version:
            return "refused"   # logged already
        if self._seen != version:
            # Read the same text twice, a check apart, before using it: a file caught while
            # an editor or a deploy tool is still writing it may parse with tenants missing.
            self._seen = version
            return "settling"
        try:
            tenants = parse_tenants(text, self.env)
        except ConfigError as exc:
            return self._refuse(version, str(exc))
        register_secrets(s for t in tenants.values() for s in t.secrets())
        old = self.live.version
        self.live.swap(TenantsConfig(tenants, version, self.live.config.source))
        self.refused = None
        log.warning("tenants configuration reloaded", extra={
            "from_version": old, "version": version, "tenants": len(tenants),
            "process_type": self.process})
        return "reloaded"

    def _refuse(self, version: str, reason: str) -> str:
        if self.refused != (version, reason):
            log.error("tenants file change refused; the old configuration stays", extra={
                "version": self.live.version, "refused_version": version, "reason": reason,
                "process_type": self.process})
        self.refused = (version, reason)
        return "refused"

    def report(self) -> None:
        """Write what this process runs to Redis (an entry per process, stamped)."""
        if self.client is None:
            return
        entry = {"process": self.process, "host": socket.gethostname(), "pid": os.getpid(),
                 "version": self.live.version, "source": self.live.config.source,
                 "at": round(self.clock.now(), 3)}
        if self.refused:
            entry["refused_version"] = self.refused[0]
            entry["refused_reason"] = self.refused[1][:300]
        pipe = self.client.pipeline(transaction=False)
        pipe.hset(keys.CONFIG_PROCESSES, self.member, json.dumps(entry))
        pipe.expire(keys.CONFIG_PROCESSES, int(REPORT_STALE_SECONDS * 4))
        pipe.execute()

    def forget(self) -> None:
        """Remove this process's entry (on a clean stop)."""
        if self.client is not None:
            with contextlib.suppress(redis.RedisError):
                self.client.hdel(keys.CONFIG_PROCESSES, self.member)

    def tick(self) -> None:
        try:
            self.poll()
            self.report()
        except redis.RedisError as exc:
            log.warning("cannot report the tenants configuration version",
                        extra={"error": repr(exc)})
        except Exception:   # the watcher must never die: a crash here would freeze the config
            log.exception("tenants reload check crashed")

    def start(self) -> TenantsReloader:
        """Report now, then check and report every ``every`` seconds (a daemon thread)."""
        if self._thread is not None:
            return self

        def loop() -> None:
            while True:
                self.tick()
                self.clock.sleep(self.every)

        self._thread = threading.Thread(target=loop, name="tenants-reload", daemon=True)
        self._thread.start()
        return self


def process_versions(client: redis.Redis, now: float) -> list[dict[str, Any]]:
    """What every live process reported (stale entries are dropped), by process type."""
    out: list[dict[str, Any]] = []
    stale: list[Any] = []
    for member, raw in client.hgetall(keys.CONFIG_PROCESSES).items():
        try:
            entry = json.loads(raw)
        except ValueError:
            stale.append(member)
            continue
        if now - float(entry.get("at", 0)) > REPORT_STALE_SECONDS:
            stale.append(member)
            continue
        out.append(entry)
    if stale:
        client.hdel(keys.CONFIG_PROCESSES, *stale)
    return sorted(out, key=lambda e: (e["process"], e["host"], e["pid"]))
