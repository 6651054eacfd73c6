"""``./dev run`` (``ops.localrun``): each run port has its own directory, Redis and sandbox
ports, and writes ``env`` so the README's commands work from another shell."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from ops.localrun import DEMO_ENV, plan, write_files


def test_runs_on_different_ports_share_nothing(tmp_path: Path) -> None:
    a = plan({"PATH": "/bin"}, tmp_path, redis_port=7001)
    b = plan({"PATH": "/bin", "PORT": "8100"}, tmp_path, redis_port=7002)
    assert a.home == tmp_path / "run-8000" and b.home == tmp_path / "run-8100"
    assert a.own_redis and b.own_redis
    assert a.env["REDIS_URL"] != b.env["REDIS_URL"]       # never DB 0 of some shared Redis
    assert a.env["DATABASE_URL"] == f"sqlite:///{tmp_path / 'run-8000' / 'history.db'}"
    assert a.env["DATABASE_URL"] != b.env["DATABASE_URL"]
    assert (a.rilla_port, a.callrail_port) == (8089, 8090)
    assert (b.rilla_port, b.callrail_port) == (8189, 8190)
    assert b.env["RILLA_BASE_URL"] == "http://127.0.0.1:8189"


def test_a_redis_url_the_user_sets_is_used_as_given(tmp_path: Path) -> None:
    p = plan({"REDIS_URL": "redis://127.0.0.1:6379/5", "TENANTS_FILE": "mine.toml"}, tmp_path)
    assert not p.own_redis and p.env["REDIS_URL"] == "redis://127.0.0.1:6379/5"
    assert not p.demo and p.env["TENANTS_FILE"] == "mine.toml"
    assert "DEMO_RILLA_KEY" not in p.env


def test_the_readme_recipe_works_from_another_shell(tmp_path: Path) -> None:
    """README: `. .local/run-8000/env` then `rilla-bridge tenants check` (it used to say
    `DEMO_RILLA_KEY is not set`)."""
    p = plan({"PATH": "/bin"}, tmp_path, redis_port=1)
    write_files(p)
    bin_dir = Path(sys.executable).parent
    env = {"PATH": f"{bin_dir}:{os.environ.get('PATH', '')}", "HOME": str(tmp_path)}
    out = subprocess.run(["/bin/sh", "-c", f". {p.env_file} && rilla-bridge tenants check"],
                         env=env, capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "1 tenant(s) OK" in out.stdout and "- demo:" in out.stdout
    for secret in DEMO_ENV.values():
        assert secret not in out.stdout


def test_the_run_has_an_admin_token_for_the_console_kept_across_runs(tmp_path: Path) -> None:
    """The console refuses everything without ADMIN_TOKEN: a new user's run makes one, keeps
    it in the run's directory (owner only) and in ``env``; a token the user set is used."""
    p = plan({"PATH": "/bin"}, tmp_path, redis_port=1)
    write_files(p)
    token = p.env["ADMIN_TOKEN"]
    assert len(token) == 32
    assert (p.home / "admin-token").stat().st_mode & 0o777 == 0o600
    assert f"export ADMIN_TOKEN={token}" in p.env_file.read_text()
    again = plan({"PATH": "/bin"}, tmp_path, redis_port=1)
    write_files(again)
    assert again.env["ADMIN_TOKEN"] == token
    mine = plan({"PATH": "/bin", "ADMIN_TOKEN": "my-own-token"}, tmp_path, redis_port=1)
    write_files(mine)
    assert mine.env["ADMIN_TOKEN"] == "my-own-token"
    assert "export ADMIN_TOKEN=my-own-token" in mine.env_file.read_text()
