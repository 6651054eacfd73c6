"""The deploy and packaging files agree with the code and with each other: app.json declares
every setting and matches the Procfile, the lock files pin what pyproject.toml asks for (and
what the tests run on), the image keeps secrets out and runs unprivileged, docker-compose.yml
has health checks and restart policies."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tomllib
from collections.abc import Iterator, Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from rilla_bridge.settings import Settings

ROOT = Path(__file__).resolve().parents[2]


class RecordingEnv(Mapping[str, str]):
    """An empty environment that remembers every name asked of it."""

    def __init__(self) -> None:
        self.asked: set[str] = set()

    def __getitem__(self, key: str) -> str:
        self.asked.add(key)
        raise KeyError(key)

    def get(self, key: str, default: Any = None) -> Any:
        self.asked.add(key)
        return default

    def __contains__(self, key: object) -> bool:
        if isinstance(key, str):
            self.asked.add(key)
        return False

    def __iter__(self) -> Iterator[str]:
        return iter(())

    def __len__(self) -> int:
        return 0


def settings_names() -> set[str]:
    env = RecordingEnv()
    Settings.from_env(env)
    return env.asked


def app_json() -> dict[str, Any]:
    data: dict[str, Any] = json.loads((ROOT / "app.json").read_text())
    return data


def procfile() -> dict[str, str]:
    out = {}
    for line in (ROOT / "Procfile").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, command = line.partition(":")
            out[name.strip()] = command.strip()
    return out


# -- app.json ------------------------------------------------------------------------------

def test_settings_are_read_through_a_mapping_the_test_can_watch() -> None:
    names = settings_names()
    # The recording works: the SPEC names and our own are all seen (a refactor that reads
    # os.environ directly would make this test vacuous).
    assert {"REDIS_URL", "ADMIN_TOKEN", "DATABASE_URL", "HISTORY_BATCH"} <= names
    assert len(names) > 30


def test_app_json_declares_every_setting_with_a_description() -> None:
    env = app_json()["env"]
    missing = settings_names() - set(env)
    assert not missing, f"settings missing from app.json env: {sorted(missing)}"
    for name, spec in env.items():
        assert re.fullmatch(r"[A-Z][A-Z0-9_]*", name), name
        assert isinstance(spec, dict), name
        assert len(spec.get("description", "")) > 10, f"{name} has no description"
        assert isinstance(spec.get("required"), bool), f"{name}: say whether it is required"
        if "value" in spec:
            assert isinstance(spec["value"], str), f"{name}: app.json values are strings"


def test_app_json_generates_the_admin_token_and_declares_tenants_toml() -> None:
    env = app_json()["env"]
    assert env["ADMIN_TOKEN"] == {**env["ADMIN_TOKEN"], "generator": "secret",
                                  "required": True}
    assert "value" not in env["ADMIN_TOKEN"]
    assert env["TENANTS_TOML"]["required"] is True
    # Heroku Redis serves TLS with a self-signed certificate.
    assert env["REDIS_TLS_CERT_REQS"]["value"] == "none"
    # The add-ons set these; a value here would point the app elsewhere.
    for name in ("REDIS_URL", "DATABASE_URL", "PORT"):
        assert "value" not in env[name] and env[name]["required"] is False


def test_app_json_addons_and_formation_match_the_procfile() -> None:
    doc = app_json()
    plans = {a["plan"].split(":")[0] if isinstance(a, dict) else a.split(":")[0]
             for a in doc["addons"]}
    assert plans == {"heroku-redis", "heroku-postgresql"}
    processes = procfile()
    assert processes["release"] == "rilla-bridge db upgrade"
    # release runs once per deploy; every other process type is a dyno of the formation.
    assert set(doc["formation"]) == set(processes) - {"release"}
    for name, dyno in doc["formation"].items():
        assert dyno["quantity"] >= 1, name


def test_variables_the_procfile_reads_are_declared() -> None:
    env = app_json()["env"]
    used = {m for cmd in procfile().values() for m in re.findall(r"\$\{?([A-Z_]+)", cmd)}
    assert used, "the Procfile names WORKER_CONCURRENCY and CALLRAIL_CONCURRENCY"
    assert used <= set(env), sorted(used - set(env))


# -- lock files ----------------------------------------------------------------------------

def pins(path: Path) -> dict[str, tuple[str, str]]:
    """name -> (version, marker) of every line of a lock file; '.' is the application."""
    out: dict[str, tuple[str, str]] = {}
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if line == ".":
            out["."] = ("", "")
            continue
        req = Requirement(line)
        spec = str(req.specifier)
        assert spec.startswith("==") and "," not in spec, f"{path.name}: not pinned: {raw}"
        out[canonicalize_name(req.name)] = (spec[2:], str(req.marker or ""))
    return out


def pyproject() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_requirements_txt_pins_every_dependency_and_installs_the_app() -> None:
    locked = pins(ROOT / "requirements.txt")
    assert "." in locked, "Heroku installs requirements.txt only: it must install the app"
    for dep in pyproject()["project"]["dependencies"]:
        req = Requirement(dep)
        name = canonicalize_name(req.name)
        assert name in locked, f"{name} is not pinned in requirements.txt"
        assert req.specifier.contains(locked[name][0]), (name, locked[name], str(req))


_PLATFORMS = [
    {"sys_platform": p, "os_name": o, "platform_python_implementation": impl,
     "implementation_name": impl.lower()}
    for p, o in (("linux", "posix"), ("darwin", "posix"), ("win32", "nt"))
    for impl in ("CPython", "PyPy")]


def _wherever(prod: str, dev: str) -> bool:
    """Every platform where the ``prod`` marker installs a package, ``dev`` does too."""
    if prod == dev or not dev:
        return True
    if not prod:
        return False
    return all(Marker(dev).evaluate(env) for env in _PLATFORMS if Marker(prod).evaluate(env))


def test_dev_lock_has_the_same_pins_plus_the_dev_extra() -> None:
    prod = pins(ROOT / "requirements.txt")
    dev = pins(ROOT / "requirements-dev.txt")
    for name, pin in prod.items():
        got = dev.get(name)
        # The same version; the dev lock may install it on more platforms than production
        # does (a dev tool needs it there too: selenium's trio wants cffi on Windows), never
        # on fewer.
        assert got is not None and got[0] == pin[0] and _wherever(pin[1], got[1]), \
            f"{name}: {pin} in requirements.txt, {got} in dev"
    for dep in pyproject()["project"]["optional-dependencies"]["dev"]:
        req = Requirement(dep)
        name = canonicalize_name(req.name)
        assert name in dev and req.specifier.contains(dev[name][0]), (name, str(req))


@pytest.mark.parametrize("package", ["celery", "kombu", "redis", "granian", "sentry-sdk"])
def test_tests_run_on_the_locked_versions(package: str) -> None:
    """CI installs the lock file: what the tests (among them the kombu ``_create_client``
    patch's and the Celery message format's) ran on is what production installs."""
    locked = pins(ROOT / "requirements.txt")[canonicalize_name(package)][0]
    assert metadata.version(package) == locked


def test_python_version_file_is_311_and_allowed_by_pyproject() -> None:
    version = (ROOT / ".python-version").read_text().strip()
    assert version == "3.11"
    assert Requirement(f"python{pyproject()['project']['requires-python']}").specifier.contains(
        "3.11.0")


# -- image and ignores ---------------------------------------------------------------------

def ignore_rules(path: Path) -> list[tuple[bool, str]]:
    rules = []
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        rules.append((negate, line.lstrip("!").rstrip("/").removeprefix("/")))
    return rules


def dockerignored(rules: list[tuple[bool, str]], path: str) -> bool:
    """Docker's .dockerignore: the last matching rule wins; a pattern matching a directory
    excludes everything below it; ``**`` matches any number of directories."""
    parts = path.split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    ignored = False
    for negate, pattern in rules:
        regex = re.escape(pattern).replace(r"\*\*/", "(.*/)?").replace(r"\*", "[^/]*")
        regex = regex.replace(r"\?", "[^/]")
        if any(re.fullmatch(regex, p) for p in prefixes):
            ignored = not negate
    return ignored


SECRETS_AND_LOCAL = [".env", ".env.production", "tenants.toml", ".local/redis/appendonly.aof",
                     ".local/bodies/ev_1.json", ".git/config", ".venv/bin/python",
                     "bench/results/intake.json", "app/__pycache__/door.cpython-311.pyc",
                     ".mypy_cache/3.11/x.json", "build/lib/app/door.py", "rilla-bridge.db"]
NEEDED_IN_IMAGE = ["pyproject.toml", "requirements.txt", "README.md", "Procfile",
                   "rilla_bridge/settings.py", "rilla_bridge/lua/intake.lua",
                   "rilla_bridge/history/migrations/env.py", "app/door.py", "workers/tasks.py",
                   "ops/cli/__init__.py", "sandbox/rilla.py", ".env.example"]


def test_dockerignore_keeps_secrets_local_data_and_caches_out_of_the_image() -> None:
    rules = ignore_rules(ROOT / ".dockerignore")
    for path in SECRETS_AND_LOCAL:
        assert dockerignored(rules, path), f"{path} would be copied into the image"
    for path in NEEDED_IN_IMAGE:
        assert not dockerignored(rules, path), f"{path} is needed to build the image"


def test_the_dockerignore_matcher_is_not_vacuous() -> None:
    rules = [(False, "*.log"), (False, "**/cache"), (True, "keep.log")]
    assert dockerignored(rules, "a.log") and not dockerignored(rules, "keep.log")
    assert dockerignored(rules, "x/y/cache/z") and not dockerignored(rules, "x/a.log")


@pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(),
                    reason="needs a git checkout")
def test_gitignore_keeps_secrets_out_of_git() -> None:
    ignored = subprocess.run(
        ["git", "check-ignore", "--no-index", ".env", ".env.local", "tenants.toml",
         ".local/x", "build/lib/x.py"],
        cwd=ROOT, capture_output=True, text=True, check=False).stdout.split()
    assert ignored == [".env", ".env.local", "tenants.toml", ".local/x", "build/lib/x.py"]
    kept = subprocess.run(["git", "check-ignore", "--no-index", ".env.example",
                           "deploy/tenants.example.toml"],
                          cwd=ROOT, capture_output=True, text=True, check=False)
    assert kept.stdout == "", kept.stdout


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


# An exact release: major.minor.patch, or for PostgreSQL (whose releases are 15.17, 16.9, ...)
# major.minor; or a digest.
RELEASE_DIGITS = {"postgres": 2}


def pinned(image: str) -> bool:
    name = image.split("@")[0].split(":")[0]
    digits = RELEASE_DIGITS.get(name.rsplit("/", 1)[-1], 3)
    release = r"\d+" + r"\.\d+" * (digits - 1)
    m = re.fullmatch(rf"[\w./-]+(:{release}(?:-[\w.-]+)?)?(@sha256:[0-9a-f]{{64}})?", image)
    return bool(m and (m.group(1) or m.group(2)))


def test_dockerfile_pins_its_base_runs_unprivileged_and_installs_the_lock() -> None:
    steps = dockerfile_instructions()
    bases = [rest.split()[0] for op, rest in steps if op == "FROM"]
    assert bases and all(pinned(b) for b in bases), bases
    users = [rest for op, rest in steps if op == "USER"]
    assert users, "the image must not run as root"
    final = users[-1].split(":")[0]
    assert final not in ("root", "0"), final
    runs = " ".join(rest for op, rest in steps if op == "RUN")
    assert "requirements.txt" in runs and "--no-deps ." in runs
    assert ("COPY", "requirements.txt ./") in steps


def test_image_pin_check_is_not_vacuous() -> None:
    assert pinned("python:3.11.15-slim-bookworm")
    assert pinned("python@sha256:" + "a" * 64)
    assert not pinned("python:3.11-slim") and not pinned("redis:7") and not pinned("postgres")
    assert pinned("postgres:15.17") and not pinned("postgres:15") and pinned("redis:7.4.11")


# -- docker-compose ------------------------------------------------------------------------

def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return data


def test_compose_services_have_health_checks_restart_policies_and_pinned_images() -> None:
    services = compose()["services"]
    assert set(procfile()) <= set(services), "docker-compose runs every Procfile process"
    for name, svc in services.items():
        assert svc.get("restart") in ("unless-stopped", "always", "on-failure", "no"), name
        if name == "release":
            assert svc["restart"] == "no"   # a one-off: a failed migration stops the start-up
            continue
        assert svc["restart"] == "unless-stopped", name
        check = svc.get("healthcheck")
        assert check and check.get("test"), f"{name} has no health check"
        if "image" in svc and "build" not in svc:
            assert pinned(svc["image"]), svc["image"]
        for dep, cond in svc.get("depends_on", {}).items():
            if dep in ("redis", "postgres"):
                assert cond == {"condition": "service_healthy"}, (name, dep)


def test_compose_env_and_tenants_templates_match() -> None:
    app = compose()["services"]["web"]
    assert app["env_file"] == ".env"
    example_env = {line.split("=", 1)[0] for line in (ROOT / ".env.example").read_text()
                   .splitlines() if re.match(r"[A-Z_]+=", line)}
    tenants = (ROOT / "deploy/tenants.example.toml").read_text()
    tomllib.loads(tenants)
    values = "\n".join(line.split("#")[0] for line in tenants.splitlines())   # not comments
    referenced = set(re.findall(r"\$\{([A-Z0-9_]+)\}", values))
    assert referenced and referenced <= example_env, sorted(referenced - example_env)
    assert "ADMIN_TOKEN" in example_env


def compose_command() -> list[str] | None:
    if shutil.which("docker") and subprocess.run(
            ["docker", "compose", "version"], capture_output=True, check=False).returncode == 0:
        return ["docker", "compose"]
    found = shutil.which("docker-compose")
    return [found] if found else None


@pytest.mark.skipif(compose_command() is None,
                    reason="no docker compose / docker-compose (.ci/run installs it)")
def test_docker_compose_config_passes(tmp_path: Path) -> None:
    """``docker compose config`` (no daemon needed) on the file as a new user has it: .env and
    tenants.toml made from their templates."""
    for name in ("docker-compose.yml", "Dockerfile"):
        shutil.copy(ROOT / name, tmp_path / name)
    shutil.copy(ROOT / ".env.example", tmp_path / ".env")
    shutil.copy(ROOT / "deploy/tenants.example.toml", tmp_path / "tenants.toml")
    cmd = compose_command()
    assert cmd is not None
    done = subprocess.run([*cmd, "config", "-q"], cwd=tmp_path, capture_output=True,
                          text=True, check=False, timeout=60)
    assert done.returncode == 0, done.stderr
    # Without .env it says so instead of starting half-configured.
    (tmp_path / ".env").unlink()
    missing = subprocess.run([*cmd, "config", "-q"], cwd=tmp_path, capture_output=True,
                             text=True, check=False, timeout=60)
    assert missing.returncode != 0 and ".env" in missing.stderr + missing.stdout
