"""Outside audit: steps in branches (asyncio.gather, asyncio.TaskGroup, timeouts in the
workflow's code, tasks it did not await) when the worker is killed with SIGKILL.

Each test starts a worker process (this file, run as a script) that is killed with
``kill -9`` at a chosen point: by a step body (``os.kill(os.getpid(), SIGKILL)``
before or after its effect) or by its store right after a given checkpoint is durable.
A second process, with the same idempotency key, recovers the run. The step bodies
append one line per effect to a log (fsynced), so the test counts every effect across
both processes and checks it against docs/guide.md ("Steps run concurrently", "Branches
cancelled by the workflow's own code", "Await every branch") and docs/workflow-api.md
(transactional steps are exactly-once).

Tests that find a defect are kept as ``xfail(strict=True)`` with the defect described.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

import cantata
from cantata import App, Retry, WorkflowContext, WorkflowError
from cantata.model import codec
from cantata.model.records import RunWrite
from cantata.store.factory import store_from_url

pytestmark = pytest.mark.slow

THIS = Path(__file__)
ROOT = THIS.parent.parent
R3 = Retry(max_attempts=3, initial_interval=0.01)  # a kill -9 counts an attempt


# -- the worker process (this file run as a script) --------------------------------------


class KillingStore:
    """A real store whose process SIGKILLs itself right after a chosen checkpoint is
    durable: ``{"commit": KEY, "status": "completed"|"failed"|"running",
    "cancelled": bool?}`` matches a ``commit_run`` carrying the entry ``KEY`` in that
    state; ``{"tx": KEY}`` the commit of transactional step ``KEY``."""

    def __init__(self, url: str, spec: dict[str, Any]) -> None:
        self._inner = store_from_url(url)
        self.url = url
        self.spec = spec

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def _matches(self, write: RunWrite) -> bool:
        spec = self.spec
        if "commit" not in spec:
            return False
        for e in write.entries:
            if e.key != spec["commit"] or str(e.status) != spec["status"]:
                continue
            if "cancelled" in spec:
                info = codec.loads(e.detail) if e.detail else {}
                if bool(info.get("cancelled")) != spec["cancelled"]:
                    continue
            return True
        return False

    async def commit_run(self, app: str, run_id: str, fence: int, write: RunWrite) -> None:
        # Matched as written, before the await: the engine may mark an entry it wrote
        # already (a branch cancelled while its step ran, engine/branches.py) and write
        # it again; the object the first write held then says so too, though that write
        # sent it unmarked.
        matches = self._matches(write)
        await self._inner.commit_run(app, run_id, fence, write)
        if matches:
            os.kill(os.getpid(), signal.SIGKILL)

    async def run_transaction(self, app: str, run_id: str, fence: int, body: Any) -> Any:
        keys: list[str] = []
        txs: list[Any] = []

        async def watched(tx: Any) -> Any:
            txs.append(tx)
            write, value = await body(tx)
            keys.extend(e.key for e in write.entries)
            return write, value

        run_transaction = getattr(self._inner, "run_transaction")  # noqa: B009 (not in Store)
        try:
            return await run_transaction(app, run_id, fence, watched)
        finally:
            # Also when the call raises: a stop of the step (its worker's hold in doubt)
            # that came during the COMMIT is raised after it, and the step completed
            # (docs/workflow-api.md): the kill point was reached all the same.
            if self.spec.get("tx") in keys and txs[-1].committed:
                os.kill(os.getpid(), signal.SIGKILL)


def build(url: str, logdir: str, kill: dict[str, Any]) -> App:
    """The app of both processes: the same workflows on the same store."""
    store: Any = KillingStore(url, kill) if ("commit" in kill or "tx" in kill) else url
    # ``kill["lease"]``: a longer lease for the killed worker (1 s: the recovering worker
    # takes its run over soon after the kill)
    app = App("audit", store=store, lease=kill.get("lease", 1.0), poll_interval=0.05,
              shutdown_grace=0.2)
    log = Path(logdir) / "effects.log"
    seen: Counter[str] = Counter()  # bodies begun in this process, by step
    began: dict[str, asyncio.Event] = {}

    def begun(step: str) -> asyncio.Event:
        return began.setdefault(step, asyncio.Event())

    def effect(step: str, arg: Any) -> None:
        line = json.dumps({"step": step, "arg": arg, "pid": os.getpid(),
                           "attempt": cantata.step_info().attempt, "t": time.time()})
        with log.open("a") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())

    async def body(step: str, arg: Any, delay: float = 0.0) -> None:
        """One step body: the effect (a log line) after ``delay``; killed by
        ``{"step": step, "nth": N, "when": "before"|"after"|"mid"}``."""
        seen[step] += 1
        begun(step).set()
        due = kill.get("step") == step and kill.get("nth", 1) == seen[step]
        if due and kill["when"] == "mid":  # in the middle of its delay
            await asyncio.sleep(delay / 2)
            os.kill(os.getpid(), signal.SIGKILL)
        await asyncio.sleep(delay)
        if due and kill["when"] == "before":
            os.kill(os.getpid(), signal.SIGKILL)
        effect(step, arg)
        if due and kill["when"] == "after":
            os.kill(os.getpid(), signal.SIGKILL)

    async def until(name: str) -> None:
        await begun(name).wait()

    # -- steps --
    @app.step(retry=R3)
    async def a1(n: int) -> int:
        await body("a1", n)
        return n + 1

    @app.step(retry=R3)
    async def a2(n: int) -> int:
        await body("a2", n)
        return n + 1

    @app.step(retry=R3)
    async def a3(n: int) -> int:
        await body("a3", n)
        return n + 1

    @app.step(retry=R3)
    async def slow(n: int) -> int:
        await body("slow", n, 0.5)
        return n * 10

    @app.step(retry=R3)
    async def b2(n: int) -> int:
        await body("b2", n)
        return n * 100

    @app.step(retry=R3)
    async def reserve(n: int) -> int:
        await body("reserve", n, 0.5 if n == 1 else 0.0)  # 1 completes last
        return n

    @app.step(retry=R3)
    async def release(n: int) -> None:
        await body("release", n)

    @app.step(retry=Retry(max_attempts=1))
    async def boom(n: int) -> None:
        await until("hold")  # hold is in progress when this branch fails
        await body("boom", n)
        raise RuntimeError(f"carrier down for {n}")

    @app.step(retry=Retry(max_attempts=1))
    async def fail(n: int) -> None:
        await body("fail", n)
        raise RuntimeError(f"card declined for {n}")

    @app.step(retry=R3)
    async def hold(n: int) -> int:
        await body("hold", n, 0.8)
        return n

    @app.step(retry=R3)
    async def unhold(n: int) -> None:
        await body("unhold", n)

    @app.step(retry=R3)
    async def after(n: int) -> None:
        await body("after", n)

    @app.step(retry=R3)
    async def fallback(n: int) -> None:
        await body("fallback", n)

    @app.step(retry=R3)
    async def quick(n: int) -> int:
        await until("hold")  # the workflow returns while hold is in progress
        await body("quick", n)
        return n

    @app.step(retry=Retry(max_attempts=1))
    async def flaky(n: int) -> None:
        begun("hold").set()
        await body("flaky", n, 0.8)
        raise RuntimeError(f"flaky for {n}")

    @app.transaction(retry=R3)
    async def txhold(tx: cantata.Tx, n: int) -> int:
        begun("hold").set()
        await asyncio.sleep(0.3)
        await tx.execute("INSERT INTO audit_fx (step, n) VALUES (?, ?)", "txhold", n)
        return n

    # -- workflows --
    @app.workflow
    async def chains(ctx: WorkflowContext, n: int) -> list[int]:
        """Two branches of several steps each: one of three quick steps, one of a slow
        step then another (begun after the quick chain has ended)."""

        async def quick_chain() -> int:
            x = await ctx.run(a1, n)
            x = await ctx.run(a2, x)
            return int(await ctx.run(a3, x))

        async def slow_chain() -> int:
            await ctx.run(slow, n)
            return int(await ctx.run(b2, n))

        x, y = await asyncio.gather(quick_chain(), slow_chain())
        return [x, y]

    @app.workflow
    async def comp_order(ctx: WorkflowContext, n: int) -> None:
        """reserve(2) completes first, reserve(1) last: undone release(1), release(2)."""
        await asyncio.gather(ctx.run(reserve, 1, compensate=release),
                             ctx.run(reserve, 2, compensate=release))
        await ctx.run(fail, n)

    @app.workflow
    async def taskgroup(ctx: WorkflowContext, n: int) -> None:
        async def holding() -> None:
            await ctx.run(hold, n, compensate=unhold)
            await ctx.run(after, n)  # its branch was cancelled meanwhile: never begun

        async with asyncio.TaskGroup() as group:
            group.create_task(holding())
            group.create_task(ctx.run(boom, n))

    @app.workflow
    async def tx_taskgroup(ctx: WorkflowContext, n: int) -> None:
        async def holding() -> None:
            await ctx.run(txhold, n, compensate=unhold)
            await ctx.run(after, n)

        async with asyncio.TaskGroup() as group:
            group.create_task(holding())
            group.create_task(ctx.run(boom, n))

    @app.workflow
    async def fail_taskgroup(ctx: WorkflowContext, n: int) -> None:
        """A step of a branch the TaskGroup cancels fails: the branch gets the cancel,
        not the failure, so its except clause never runs."""

        async def holding() -> None:
            try:
                await ctx.run(flaky, n)
            except cantata.StepFailed:
                await ctx.run(after, n)

        async with asyncio.TaskGroup() as group:
            group.create_task(holding())
            group.create_task(ctx.run(boom, n))

    @app.workflow
    async def tx_timed(ctx: WorkflowContext, n: int) -> str:
        """The workflow's own timeout cancels txhold while its transaction runs."""
        try:
            async with asyncio.timeout(0.1):
                await ctx.run(txhold, n, compensate=unhold)
        except TimeoutError:
            await ctx.run(fallback, n)
            return "timed out"
        return "in time"

    @app.workflow
    async def inline_tg(ctx: WorkflowContext, n: int) -> None:
        """The TaskGroup's body awaits a step in the run's own task."""
        async with asyncio.TaskGroup() as group:
            group.create_task(ctx.run(boom, n))
            await ctx.run(hold, n, compensate=unhold)
            await ctx.run(after, n)

    @app.workflow
    async def waited(ctx: WorkflowContext, n: int) -> str:
        try:
            await asyncio.wait_for(ctx.run(hold, n, compensate=unhold), 0.2)
        except TimeoutError:
            await ctx.run(fallback, n)
            raise RuntimeError("too slow") from None
        return "in time"

    @app.workflow
    async def tx_gather(ctx: WorkflowContext, n: int) -> list[int]:
        return list(await asyncio.gather(ctx.run(txhold, 1), ctx.run(txhold, 2)))

    @app.workflow
    async def timed(ctx: WorkflowContext, n: int) -> str:
        try:
            async with asyncio.timeout(0.2):
                await ctx.run(hold, n, compensate=unhold)
        except TimeoutError:
            await ctx.run(fallback, n)
            return "timed out"
        return "in time"

    @app.workflow
    async def unawaited(ctx: WorkflowContext, n: int) -> str:
        async def holding() -> None:
            await ctx.run(hold, n, compensate=unhold)
            await ctx.run(after, n)  # the run has returned by then: never begun

        asyncio.create_task(holding())  # noqa: RUF006 (the mistake the docs allow for)
        await ctx.run(quick, n)
        if n < 0:
            raise ValueError("negative order")
        return "placed"

    return app


async def _make_table(url: str) -> None:
    """The table of the transactional step, in the store's database."""
    if url.startswith("sqlite:///"):
        import sqlite3

        lite = sqlite3.connect(url.removeprefix("sqlite:///"))
        lite.execute("CREATE TABLE IF NOT EXISTS audit_fx (step TEXT, n INTEGER)")
        lite.commit()
        lite.close()
        return
    import asyncpg

    base, _, query = url.partition("?schema=")
    conn = await asyncpg.connect(base)
    try:
        await conn.execute(f'CREATE TABLE IF NOT EXISTS "{query}".audit_fx (step TEXT, n INT)')
    finally:
        await conn.close()


async def child(url: str, logdir: str, workflow: str, key: str, kill: str, arg: str) -> None:
    app = build(url, logdir, json.loads(kill))
    async with app:
        await _make_table(url)
        handle = await app.start(workflow, int(arg), idempotency_key=key)
        try:
            result = await handle.result(timeout=20)
            out = {"run_id": handle.run_id, "status": "completed", "result": result}
        except WorkflowError as exc:
            out = {"run_id": handle.run_id, "status": exc.status, "error": exc.error}
    print(json.dumps(out), flush=True)


# -- the tests ---------------------------------------------------------------------------


class Worker:
    """Runs worker processes of one test on one store and reads what they did."""

    def __init__(self, url: str, tmp_path: Path) -> None:
        self.url = url
        self.logdir = tmp_path / "logs"
        self.logdir.mkdir()

    def _run(self, workflow: str, key: str, kill: dict[str, Any], arg: int) -> Any:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            [str(ROOT / "src"), str(ROOT), os.environ.get("PYTHONPATH", "")])}
        return subprocess.run(
            [sys.executable, str(THIS), self.url, str(self.logdir), workflow, key,
             json.dumps(kill), str(arg)],
            capture_output=True, text=True, timeout=60, check=False, env=env, cwd=ROOT,
        )

    def killed(self, workflow: str, kill: dict[str, Any], *, arg: int = 1,
               key: str = "k1") -> None:
        """A worker runs ``workflow`` until it is killed as ``kill`` says."""
        proc = self._run(workflow, key, kill, arg)
        assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stdout, proc.stderr)

    def outcome(self, workflow: str, *, arg: int = 1, key: str = "k1") -> dict[str, Any]:
        """A new worker resumes (or runs) the run with the same key: how it ended."""
        proc = self._run(workflow, key, {}, arg)
        assert proc.returncode == 0, proc.stderr
        out: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
        return out

    def effects(self) -> list[tuple[str, Any]]:
        path = self.logdir / "effects.log"
        if not path.exists():
            return []
        return [(d["step"], d["arg"]) for d in map(json.loads, path.read_text().splitlines())]

    def count(self) -> Counter[tuple[str, Any]]:
        return Counter(self.effects())

    def history(self, run_id: str) -> list[Any]:
        async def read() -> list[Any]:
            app = App("audit", store=self.url)
            async with app.client():
                return await app.store.load_history(app.name, run_id)

        return asyncio.run(read())

    def tx_rows(self) -> list[tuple[Any, ...]]:
        async def read() -> list[tuple[Any, ...]]:
            if self.url.startswith("sqlite:///"):
                import sqlite3

                lite = sqlite3.connect(self.url.removeprefix("sqlite:///"))
                try:
                    return [tuple(r) for r in lite.execute("SELECT step, n FROM audit_fx")]
                finally:
                    lite.close()
            import asyncpg

            base, _, schema = self.url.partition("?schema=")
            conn = await asyncpg.connect(base)
            try:
                rows = await conn.fetch(f'SELECT step, n FROM "{schema}".audit_fx')
                return [tuple(r) for r in rows]
            finally:
                await conn.close()

        return asyncio.run(read())


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The store of a test whose store takes part in what it checks: a transaction
    (``run_transaction``), or a checkpoint the kill follows (``commit_run``) and the
    claim that takes over the killed worker's run. A test whose cases differ only in the
    workflow's shape (how the engine replays, cancels and unwinds branches, the same
    code over any store) runs every case on SQLite and the store's part once on
    PostgreSQL: :func:`stores`."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/audit.db"
    from tests.helpers import with_schema

    schema: str = request.getfixturevalue("pooled_schema")
    return with_schema(request.getfixturevalue("postgres_url"), schema)


def stores(cases: list[Any], ids: list[str], on_postgres: set[str]) -> list[Any]:
    """``(url, case)`` parameters: every case on SQLite, those named in ``on_postgres``
    on PostgreSQL too (``url`` is parametrized indirectly: the fixture makes the store)."""
    out = [pytest.param("sqlite", case, id=f"sqlite-{i}") for case, i in zip(cases, ids,
                                                                          strict=True)]
    out += [pytest.param("postgres", case, id=f"postgres-{i}", marks=pytest.mark.postgres)
            for case, i in zip(cases, ids, strict=True) if i in on_postgres]
    assert len(out) == len(cases) + len(on_postgres), on_postgres  # (no id misspelt)
    return out


def _cancelled(history: list[Any], key: str) -> bool:
    [entry] = [e for e in history if e.key == key]
    return bool(codec.loads(entry.detail or "{}").get("cancelled"))



def _check(w: Worker, out: dict[str, Any], status: str, *, result: Any = None,
           error: str | None = None, effects: dict[str, int], cancelled: tuple[str, ...] = (),
           absent: tuple[str, ...] = ()) -> None:
    assert out["status"] == status, out
    if result is not None:
        assert out["result"] == result, out
    if error is not None:
        assert error in out["error"], out
    done = Counter(step for step, _ in w.effects())
    assert {k: done[k] for k in effects} == effects, w.effects()
    history = w.history(out["run_id"])
    keys = {e.key for e in history}
    for key in cancelled:
        assert _cancelled(history, key), [(e.key, e.detail) for e in history]
    assert not keys.intersection(absent), sorted(keys)


TG_DONE: dict[str, Any] = {
    "effects": {"boom": 1, "hold": 1, "unhold": 1, "after": 0},
    "error": "carrier down", "cancelled": ("hold#1",), "absent": ("after#1",),
}
TIMED_DONE: dict[str, Any] = {
    "result": "timed out", "effects": {"hold": 1, "fallback": 1, "unhold": 0},
    "cancelled": ("hold#1",),
}
WAITED_DONE: dict[str, Any] = {
    "error": "too slow", "effects": {"hold": 1, "fallback": 1, "unhold": 1},
    "cancelled": ("hold#1",),
}
UNAWAITED_DONE: dict[str, Any] = {
    "result": "placed", "effects": {"quick": 1, "hold": 1, "after": 0}, "absent": ("after#1",),
}

# (workflow, argument, where the first worker is killed, final status, what is expected)
HELD_UP: list[tuple[str, int, dict[str, Any], str, dict[str, Any]]] = [
    # TaskGroup: boom fails while hold runs; hold runs to its end, is undone; after never
    ("taskgroup", 1, {"step": "hold", "nth": 1, "when": "mid"}, "compensated", TG_DONE),
    ("taskgroup", 1, {"commit": "hold#1", "status": "completed", "cancelled": True},
     "compensated", TG_DONE),
    ("taskgroup", 1, {"step": "unhold", "nth": 1, "when": "before"}, "compensated", TG_DONE),
    ("taskgroup", 1, {"step": "unhold", "nth": 1, "when": "after"}, "compensated",
     {**TG_DONE, "effects": {"boom": 1, "hold": 1, "unhold": 2, "after": 0}}),  # at-least-once
    # the same with the step awaited by the TaskGroup's body (the run's own task)
    ("inline_tg", 1, {"step": "hold", "nth": 1, "when": "mid"}, "compensated", TG_DONE),
    ("inline_tg", 1, {"commit": "hold#1", "status": "completed"}, "compensated", TG_DONE),
    # asyncio.timeout / wait_for around ctx.run
    ("timed", 1, {"step": "hold", "nth": 1, "when": "mid"}, "completed", TIMED_DONE),
    ("timed", 1, {"commit": "hold#1", "status": "completed", "cancelled": True}, "completed",
     TIMED_DONE),
    ("timed", 1, {"step": "fallback", "nth": 1, "when": "before"}, "completed", TIMED_DONE),
    ("waited", 1, {"step": "hold", "nth": 1, "when": "mid"}, "compensated", WAITED_DONE),
    ("waited", 1, {"step": "unhold", "nth": 1, "when": "before"}, "compensated", WAITED_DONE),
    # a branch the workflow did not await, in progress when it returned (or raised)
    ("unawaited", 1, {"step": "hold", "nth": 1, "when": "mid"}, "completed", UNAWAITED_DONE),
    ("unawaited", 1, {"commit": "hold#1", "status": "completed"}, "completed", UNAWAITED_DONE),
    ("unawaited", -1, {"step": "hold", "nth": 1, "when": "mid"}, "compensated",
     {"error": "negative order", "effects": {"quick": 1, "hold": 1, "unhold": 1, "after": 0},
      "absent": ("after#1",)}),
    # gather: one branch done and durable, the other's step in progress
    ("chains", 1, {"commit": "a3#1", "status": "completed"}, "completed",
     {"result": [4, 100], "effects": {"a1": 1, "a2": 1, "a3": 1, "slow": 1, "b2": 1}}),
]


HELD_UP_IDS = [f"{c[0]}({c[1]})-{json.dumps(c[2], sort_keys=True)}" for c in HELD_UP]


# On PostgreSQL: a kill in a step body (the recovering worker claims the run once the
# killed one's lease has lapsed) and one right after a checkpoint marking a cancelled
# branch is durable (what the recovering worker reads back). The other cases kill at the
# same two kinds of point in other shapes of workflow: engine code, the same on any store.
@pytest.mark.parametrize(("url", "case"), stores(HELD_UP, HELD_UP_IDS, {
    'taskgroup(1)-{"nth": 1, "step": "hold", "when": "mid"}',
    'taskgroup(1)-{"cancelled": true, "commit": "hold#1", "status": "completed"}',
}), indirect=["url"])
def test_a_worker_killed_around_branch_steps_leaves_a_run_that_recovers_as_documented(
    url: str, tmp_path: Path, case: tuple[str, int, dict[str, Any], str, dict[str, Any]]
) -> None:
    """kill -9 during parallel steps, during a cancelled step's run to its end, right
    after its outcome is durable, during the unwind, while a returned run waits for a
    branch it did not await: the recovered run ends as documented, every step body's
    effect counted (a body cut by the kill runs again; none that completed does)."""
    workflow, arg, kill, status, expected = case
    w = Worker(url, tmp_path)
    w.killed(workflow, kill, arg=arg)
    _check(w, w.outcome(workflow, arg=arg), status, **expected)


def test_on_nats_a_step_a_taskgroup_cancels_is_recovered_after_a_kill(
    distributed_url: str, tmp_path: Path
) -> None:
    """The same on PostgreSQL + NATS JetStream (CANTATA_BROKER, inherited by the workers)."""
    w = Worker(distributed_url, tmp_path)
    w.killed("taskgroup", {"step": "hold", "nth": 1, "when": "mid"})
    _check(w, w.outcome("taskgroup"), "compensated", **TG_DONE)


def test_transactional_steps_in_parallel_branches_are_exactly_once_across_a_kill(
    url: str, tmp_path: Path
) -> None:
    """docs/workflow-api.md: a transactional step that committed is never run again.
    The worker dies right after the first of two parallel transactional steps
    committed (the other still to run or in progress)."""
    w = Worker(url, tmp_path)
    w.killed("tx_gather", {"tx": "txhold#1"})
    out = w.outcome("tx_gather")
    assert out["status"] == "completed" and out["result"] == [1, 2], out
    assert sorted(w.tx_rows()) == [("txhold", 1), ("txhold", 2)]


# SQLite: engine code, a recorded compensation is not run again (on PostgreSQL: the unwind below)
@pytest.mark.parametrize("url", ["sqlite"], indirect=True)
def test_a_kill_mid_unwind_compensates_each_completed_parallel_step_once(
    url: str, tmp_path: Path
) -> None:
    """gather(reserve(1), reserve(2)) with compensate=release; reserve(2) completes
    first, then a step fails: the unwind runs release(1) (compensate:release#1), then
    release(2) (#2). The worker dies before release(2)'s body. The recovered run must
    run release(2) once; release(1), recorded, never again."""
    w = Worker(url, tmp_path)
    w.killed("comp_order", {"step": "release", "nth": 2, "when": "before"})
    assert w.effects() == [("reserve", 2), ("reserve", 1), ("fail", 1), ("release", 1)]
    out = w.outcome("comp_order")
    assert out["status"] == "compensated", out
    releases = [arg for step, arg in w.effects() if step == "release"]
    assert releases == [1, 2]  # actual: [1, 1]


def test_an_unwind_begun_after_a_kill_undoes_the_last_completed_step_first(
    url: str, tmp_path: Path
) -> None:
    """As above; the worker dies once the failed step is recorded, before the unwind:
    the recovered run undoes reserve(1) (completed last) first. Actual: release(2),
    release(1)."""
    w = Worker(url, tmp_path)
    w.killed("comp_order", {"commit": "fail#1", "status": "failed"})
    out = w.outcome("comp_order")
    assert out["status"] == "compensated", out
    assert [arg for step, arg in w.effects() if step == "release"] == [1, 2]


# SQLite: engine code, the replay of a gather (kills of both kinds on PostgreSQL: HELD_UP)
@pytest.mark.parametrize("url", ["sqlite"], indirect=True)
@pytest.mark.parametrize("kill", [
    {"step": "b2", "nth": 1, "when": "before"},  # b2 in progress: resumed
    {"commit": "slow#1", "status": "completed"},  # b2 not begun: a new call
], ids=["b2-in-progress", "b2-not-begun"])
def test_a_replay_of_gather_branches_of_several_steps_does_not_diverge(
    url: str, tmp_path: Path, kill: dict[str, Any]
) -> None:
    """gather(a1 -> a2 -> a3, slow -> b2): the quick chain has ended, b2 begins once
    slow has; the worker dies then. The recovered run replays a1..a3 and slow and runs
    b2: no code changed, so no NonDeterminismError."""
    w = Worker(url, tmp_path)
    w.killed("chains", kill)
    out = w.outcome("chains")
    assert out["status"] == "completed", out  # actual: failed, NonDeterminismError
    assert out["result"] == [4, 100]
    done = Counter(step for step, _ in w.effects())
    assert [done[s] for s in ("a1", "a2", "a3", "slow", "b2")] == [1, 1, 1, 1, 1]


@pytest.mark.postgres
def test_a_kill_after_a_transactional_step_of_a_cancelled_branch_begins_nothing_more(
    postgres_url: str, pooled_schema: str, tmp_path: Path
) -> None:
    """TaskGroup(txhold -> after, boom): boom fails (recorded) while txhold's
    transaction runs; the worker dies right after that transaction commits. Expected
    after recovery: txhold's row once, after never begun, unhold once, compensated.
    (PostgreSQL only: on SQLite the transaction holds the write lock, so boom's
    failure is recorded after it commits, and the branch is not cancelled by then.)"""
    from tests.helpers import with_schema

    w = Worker(with_schema(postgres_url, pooled_schema), tmp_path)
    w.killed("tx_taskgroup", {"tx": "txhold#1"})
    out = w.outcome("tx_taskgroup")
    assert w.tx_rows() == [("txhold", 1)]  # exactly-once: this holds
    assert out["status"] == "compensated" and "carrier down" in out["error"], out
    done = Counter(step for step, _ in w.effects())
    assert (done["unhold"], done["after"]) == (1, 0), w.effects()  # actual: after ran



def test_a_kill_after_a_transactional_step_a_timeout_cancelled_replays_the_timeout(
    url: str, tmp_path: Path
) -> None:
    """asyncio.timeout(0.1) around txhold (0.3 s): the timeout cancels the step's
    branch while its transaction runs (no store write needed: SQLite too); the worker
    dies right after that transaction commits. The step's entry says its branch was
    cancelled, so the recovered run times out there again: "timed out", fallback
    once, txhold's row once.

    The killed worker's lease is 3 s, not 1 s: on SQLite the step's transaction holds
    the database's write lock, so the worker's own heartbeats wait for its COMMIT.
    With a 1 s lease a loaded machine (0.3 s of step, the lock taken late) left the
    last heartbeat more than 3/4 lease old: the worker stopped the step's body for its
    hold in doubt (docs/leases.md) and the transaction rolled back. A step whose branch
    was cancelled then began nothing new, not even the stopped attempt again: the run
    ended "timed out" with no row and no kill, txhold's entry left ``running``. (A
    fenced attempt now starts again even in a cancelled branch, docs/leases.md:
    tests/engine/test_pause_guard.py.)"""
    w = Worker(url, tmp_path)
    w.killed("tx_timed", {"tx": "txhold#1", "lease": 3.0})
    out = w.outcome("tx_timed")
    assert w.tx_rows() == [("txhold", 1)]
    assert out == {**out, "status": "completed", "result": "timed out"}, out
    done = Counter(step for step, _ in w.effects())
    assert (done["fallback"], done["unhold"]) == (1, 0), w.effects()
    assert _cancelled(w.history(out["run_id"]), "txhold#1")


# SQLite: engine code, a checkpoint marking a cancelled branch (on PostgreSQL: HELD_UP)
@pytest.mark.parametrize("url", ["sqlite"], indirect=True)
def test_a_kill_after_a_failed_step_of_a_cancelled_branch_begins_nothing_more(
    url: str, tmp_path: Path
) -> None:
    """TaskGroup(try flaky except StepFailed: after, boom): boom fails while flaky
    runs, so flaky's branch gets the cancel, not flaky's failure, and its except
    clause never runs. The worker dies right after flaky's failure is durable. The
    recovered run ends the same: after never begun, flaky's entry marked."""
    w = Worker(url, tmp_path)
    w.killed("fail_taskgroup", {"commit": "flaky#1", "status": "failed"})
    out = w.outcome("fail_taskgroup")
    assert out["status"] == "failed" and "(1 sub-exception)" in out["error"], out
    assert "carrier down" in out["error"], out
    done = Counter(step for step, _ in w.effects())
    assert (done["boom"], done["flaky"], done["after"]) == (1, 1, 0), w.effects()
    assert _cancelled(w.history(out["run_id"]), "flaky#1")


if __name__ == "__main__":
    asyncio.run(child(*sys.argv[1:7]))
