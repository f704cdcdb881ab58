"""``cantata token create|list|revoke`` and ``cantata serve`` as a user runs them."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from cantata.cli.main import main
from cantata.store.factory import store_from_url
from tests.helpers import free_port
from tests.server.shop import make_shop

ROOT = Path(__file__).resolve().parents[2]


def cantata(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cantata", *args], capture_output=True,
                          text=True, timeout=60, cwd=ROOT, env={**os.environ, **(env or {})})


def shop_store(url: str) -> str:
    """A store the shop's code has opened (the CLI creates none: workers and apps do)."""

    async def go() -> None:
        async with make_shop(url).client():
            pass

    asyncio.run(go())
    return url


def in_process(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """``cantata ARGS`` run by the CLI's ``main`` in this process (what ``python -m
    cantata`` runs, less the start of a Python process): its exit code, stdout, stderr."""
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.slow
def test_tokens_are_printed_once_listed_by_name_and_revoked(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The token is made by a real ``cantata`` process (what it prints, where, and its
    exit code); listing, refusals and revoking by ``main`` in this process: six
    processes fewer, each of which imported cantata (25 of the test's 35 s at load 14)."""
    store = shop_store(f"sqlite:///{tmp_path}/t.db")
    made = cantata("token", "create", "--name", "alice", "--role", "operator", "--store", store)
    assert made.returncode == 0, made.stderr
    token = made.stdout.strip()
    assert token.startswith("cantata_") and len(token) > 40 and "\n" not in token
    assert "shown this once" in made.stderr
    _, listed, _ = in_process(capsys, "token", "list", "--store", store)
    assert "alice" in listed and "operator" in listed
    assert token not in listed and token[8:20] not in listed
    assert token.encode() not in Path(f"{tmp_path}/t.db").read_bytes()  # only its hash
    code, _, err = in_process(capsys, "token", "create", "--name", "alice", "--role",
                              "viewer", "--store", store)
    assert code == 1 and "already named 'alice'" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    code, _, err = in_process(capsys, "token", "create", "--name", "bob", "--role", "root",
                              "--store", store)
    assert code == 1 and "viewer, operator, admin" in err
    assert in_process(capsys, "token", "revoke", "alice", "--store", store)[0] == 0
    assert "revoked" in in_process(capsys, "token", "list", "--store", store)[1]
    code, _, err = in_process(capsys, "token", "revoke", "alice", "--store", store)
    assert code == 1 and "no active token named 'alice'" in err


def _serving(args: list[str], env: dict[str, str], port: int, token: str) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "cantata", "serve", *args, "--port",
                             str(port)], cwd=ROOT, env={**os.environ, **env},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                r = httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=1)
                if r.status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "cantata serve did not answer"
            time.sleep(0.1)
        h = {"Authorization": f"Bearer {token}"}
        runs = httpx.get(f"http://127.0.0.1:{port}/api/runs", headers=h, timeout=5)
        assert runs.status_code == 200 and runs.json()["next_cursor"] is None
        assert httpx.get(f"http://127.0.0.1:{port}/api/runs", timeout=5).status_code == 401
        page = httpx.get(f"http://127.0.0.1:{port}/login", timeout=5)
        assert "Log in" in page.text and "server" not in page.headers
    finally:
        proc.terminate()
        out, err = proc.communicate(timeout=30)
    assert token not in out + err


@pytest.mark.slow
def test_serve_from_the_store_alone_and_from_the_code(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``cantata serve`` in real processes; the token they are asked with, and the
    refusal of a store without an app, by ``main`` in this process (no server starts)."""
    store = shop_store(f"sqlite:///{tmp_path}/s.db")
    code, token, _ = in_process(capsys, "token", "create", "--name", "ops", "--role", "admin",
                                "--store", store)
    assert code == 0
    token = token.strip()
    _serving(["--store", store, "--app", "shop"], {}, free_port(), token)
    _serving(["tests.server.served_app:app"], {"SHOP_STORE": store}, free_port(), token)
    empty = f"sqlite:///{tmp_path}/empty.db"

    async def no_app() -> None:
        store = store_from_url(empty)
        await store.open()
        await store.close()

    asyncio.run(no_app())
    code, _, err = in_process(capsys, "serve", "--store", empty)
    assert code == 1 and "which app?" in err
