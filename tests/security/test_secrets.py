"""Passwords never appear in anything Cantata prints: errors, logs, banners, CLI output."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cantata import App, CantataError, ConfigurationError
from cantata.cli.main import main
from cantata.model import secrets
from cantata.store.factory import mask_url
from tests.helpers import drop_schema

SECRET = "SeCrEt-pw-8731"


@pytest.mark.parametrize(
    "url",
    [
        f"postgresql://u:{SECRET}@127.0.0.1:5432/db",
        f"postgresql://127.0.0.1/db?user=u&password={SECRET}",
        f"postgres://u:{SECRET}@h/db?schema=x",
        f"nats://u:{SECRET}@127.0.0.1:4222",
        f"nats://127.0.0.1:4222?token={SECRET}",
    ],
)
def test_urls_are_masked(url: str) -> None:
    masked = mask_url(url)
    assert SECRET not in masked
    assert "***" in masked


def test_a_remembered_password_is_masked_anywhere() -> None:
    mask_url(f"postgresql://u:{SECRET}@h/db")
    text = f'driver said: password authentication failed ("{SECRET}")'
    assert SECRET not in secrets.mask(text)


def test_error_messages_are_masked() -> None:
    err = ConfigurationError(f"cannot reach postgresql://u:{SECRET}@h/db")
    assert SECRET not in str(err)
    assert isinstance(err, CantataError)


@given(st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-_.~", min_size=3, max_size=30))
def test_any_userinfo_password_is_masked(pw: str) -> None:
    assert f":{pw}@" not in secrets.mask(f"postgresql://user:{pw}@host:5432/db")


def test_log_records_are_masked(caplog: pytest.LogCaptureFixture) -> None:
    handler = logging.StreamHandler()
    logger = logging.getLogger("cantata.test.masking")
    handler.addFilter(secrets.MaskingFilter())
    record = logger.makeRecord(
        logger.name, logging.WARNING, __file__, 1, "lost %s", (f"nats://a:{SECRET}@h",), None
    )
    for f in handler.filters:
        assert isinstance(f, logging.Filter)
        f.filter(record)
    assert SECRET not in record.getMessage()


@pytest.mark.slow
def test_cli_errors_hide_the_password(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The store keeps retrying a server it cannot reach for 0.3 s, not its default 3 s:
    # still a few tries (0.1, then 0.2 s apart) before the same error, in a tenth of
    # the time (three of the URLs below name a port nobody listens on).
    from cantata.store.postgres_core import PostgresCore

    defaults = {**(PostgresCore.__init__.__kwdefaults__ or {}), "connect_timeout": 0.3}
    monkeypatch.setattr(PostgresCore.__init__, "__kwdefaults__", defaults)
    url = f"postgresql://u:{SECRET}@127.0.0.1:1/nowhere"
    for args in (["runs", "--app", "shop", "--store", url],
                 ["trace", "abc", "--app", "shop", "--store", url],
                 ["run", "abc", "--app", "shop", "--store", url],
                 ["runs", "--app", "shop", "--store", url + "?password=" + SECRET],
                 ["runs", "--app", "shop", "--store", f"postgresql://u:{SECRET}@[bad"]):
        code = main(args)
        out, err = capsys.readouterr()
        assert code != 0
        assert SECRET not in out + err, args
        assert "Traceback" not in out + err


def test_app_repr_and_errors_hide_the_password() -> None:
    app = App("shop", store=f"postgresql://u:{SECRET}@127.0.0.1:1/x")
    assert SECRET not in repr(app)


@pytest.mark.slow
@pytest.mark.postgres
def test_the_worker_banner_and_logs_hide_the_password(
    postgres_url: str, tmp_path: Path
) -> None:
    """Everything a worker prints, start to stop, is grepped for the password."""
    base = postgres_url.split("://", 1)[1]
    userinfo, _, rest = base.partition("@")
    user = userinfo.split(":")[0] or "postgres"
    schema = f"t_{uuid.uuid4().hex[:12]}"
    # trust auth accepts any password: the URL carries one, as a production URL does
    url = f"postgresql://{user}:{SECRET}@{rest}?schema={schema}"
    (tmp_path / "secret_app.py").write_text(textwrap.dedent("""
        from cantata import App
        app = App("secretshop")

        @app.step
        def hello(x: int) -> int:
            return x

        @app.workflow
        async def flow(ctx, x: int) -> int:
            return await ctx.run(hello, x)
    """))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path])}
    printed = tmp_path / "worker.out"
    with printed.open("wb") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "cantata.cli.main", "worker", "secret_app:app", "--store",
             url, "--broker", "embedded"],
            cwd=tmp_path, env=env, stdout=sink, stderr=subprocess.STDOUT,
        )
    try:
        # The stop comes once the worker serves (its banner): a SIGTERM that lands while
        # the interpreter still imports (seconds on a loaded machine) ends it unprinted.
        deadline = time.monotonic() + 60
        while "serving app" not in printed.read_text(errors="replace"):
            assert proc.poll() is None, printed.read_text(errors="replace")
            assert time.monotonic() < deadline, "the worker printed no banner within 60 s"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        asyncio.run(drop_schema(postgres_url, schema))  # the worker made it
    out = printed.read_text(errors="replace")
    assert "secretshop" in out, out
    assert "stopping:" in out, out  # everything it printed, to its stop
    assert SECRET not in out
    # a start against a refused port also prints nothing secret
    bad = subprocess.run(
        [sys.executable, "-m", "cantata.cli.main", "start", "secret_app:app", "flow",
         "--input", "1", "--store", f"postgresql://{user}:{SECRET}@127.0.0.1:1/x"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60,
    )
    assert bad.returncode != 0
    assert SECRET not in bad.stdout + bad.stderr
