"""The store contract, part five: what the console needs (pages of runs, counts, API
tokens, operator actions in the audit log)."""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cantata.errors import TokenExists
from cantata.model import codec
from cantata.model.access import (
    AttentionCounts,
    Role,
    RunQuery,
    TokenRecord,
    hash_token,
    new_token,
)
from cantata.model.records import RunRecord, RunWrite
from cantata.model.status import RunStatus
from cantata.store.audit import AuditKey
from cantata.store.base import Store
from cantata.testing.contract.support import StoreFixtures, new_run


async def page_all(store: Store, app: str, q: RunQuery) -> list[RunRecord]:
    """Every run ``q`` matches, following the keyset page by page."""
    out: list[RunRecord] = []
    after: tuple[float, str] | None = None
    while True:
        page = await store.query_runs(app, dataclasses.replace(q, after=after))
        out += page
        if len(page) < q.limit:
            return out
        after = (page[-1].created_at, page[-1].run_id)


class ConsoleContract(StoreFixtures):
    """Pages of runs by keyset, counts by status, tokens kept as hashes."""

    async def seed(self, store: Store) -> list[RunRecord]:
        """12 runs of two workflows, several sharing one creation time (ties by id)."""
        runs: list[RunRecord] = []
        for i in range(12):
            run = new_run(self.app, "place_order" if i % 3 else "refund",
                          idempotency_key=f"key-{i}", correlation_id=f"corr-{i % 4}")
            if i in (4, 5, 6):  # the same instant: the order falls back on run_id
                run.created_at = runs[3].created_at
            stored, _ = await store.create_run(run)
            runs.append(stored)
        await store.commit_run(self.app, runs[2].run_id, 0, RunWrite(
            status=RunStatus.FAILED, error="E: x", release=True))
        await store.commit_run(self.app, runs[7].run_id, 0, RunWrite(
            status=RunStatus.FAILED, error="E: y", release=True))
        return runs

    @staticmethod
    def newest_first(runs: list[RunRecord]) -> list[str]:
        return [r.run_id for r in sorted(runs, key=lambda r: (r.created_at, r.run_id),
                                         reverse=True)]

    async def test_pages_cover_every_run_once_newest_first(self, store: Store) -> None:
        runs = await self.seed(store)
        other, _ = await store.create_run(new_run(f"{self.app}-other"))
        for limit in (1, 3, 5, 12, 50):
            got = await page_all(store, self.app, RunQuery(limit=limit))
            assert [r.run_id for r in got] == self.newest_first(runs), limit
        assert other.run_id not in {r.run_id for r in got}

    async def test_filters_each_and_together(self, store: Store) -> None:
        runs = await self.seed(store)

        async def ids(**kw: Any) -> list[str]:
            return [r.run_id for r in await page_all(store, self.app, RunQuery(limit=4, **kw))]

        assert await ids(workflow="refund") == self.newest_first(
            [r for r in runs if r.workflow == "refund"])
        failed = await ids(status=RunStatus.FAILED)
        assert failed == [runs[7].run_id, runs[2].run_id]
        assert await ids(status=RunStatus.FAILED, workflow="place_order") == failed
        assert await ids(status=RunStatus.FAILED, workflow="refund") == []
        assert await ids(idempotency_key="key-9") == [runs[9].run_id]
        assert await ids(correlation_id="corr-1") == self.newest_first(
            [r for r in runs if r.correlation_id == "corr-1"])
        since, until = runs[3].created_at, runs[8].created_at
        assert await ids(since=since, until=until) == self.newest_first(
            [r for r in runs if since <= r.created_at < until])
        assert await ids(workflow="nope") == []

    @settings(max_examples=15, deadline=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture,
                                     HealthCheck.differing_executors])
    @given(limit=st.integers(1, 7), cut=st.integers(0, 11), wf=st.sampled_from([None, "refund"]))
    async def test_any_page_size_and_start_agree_with_one_sort(
        self, store: Store, limit: int, cut: int, wf: str | None
    ) -> None:
        if not getattr(self, "_seeded", None):
            self._seeded = await self.seed(store)
        runs = self._seeded
        pool = [r for r in runs if wf is None or r.workflow == wf]
        order = sorted(pool, key=lambda r: (r.created_at, r.run_id), reverse=True)
        start = runs[cut]
        after = (start.created_at, start.run_id)
        want = [r.run_id for r in order if (r.created_at, r.run_id) < after][:limit]
        page = await store.query_runs(self.app, RunQuery(workflow=wf, after=after, limit=limit))
        assert [r.run_id for r in page] == want

    async def test_counts_by_status(self, store: Store) -> None:
        assert await store.count_runs(self.app) == {}
        await self.seed(store)
        assert await store.count_runs(self.app) == {"pending": 10, "failed": 2}

    async def test_the_runs_failed_since_a_time_are_counted_and_listed_whenever_created(
        self, store: Store
    ) -> None:
        """The overview's "failed in the last hour": runs that failed at or after a
        time, by when they failed, not when they were created (the seed's runs were
        created long before they fail); a run retried since is not failed."""
        assert await store.attention_counts(self.app, failed_since=0.0) == AttentionCounts(0, 0)
        start = time.time() - 1  # (the store's clock may lag this one a little)
        runs = await self.seed(store)  # created in 2023, two failed now
        other, _ = await store.create_run(new_run(f"{self.app}-other"))
        await store.commit_run(f"{self.app}-other", other.run_id, 0, RunWrite(
            status=RunStatus.FAILED, error="E: z", release=True))
        failed = [runs[7].run_id, runs[2].run_id]  # newest created first
        assert (await store.attention_counts(self.app, failed_since=start)).failed_since == 2

        async def ids(**kw: Any) -> list[str]:
            return [r.run_id for r in await page_all(store, self.app, RunQuery(limit=1, **kw))]

        assert await ids(failed_since=start) == failed
        assert await ids(failed_since=start, status=RunStatus.FAILED) == failed
        assert await ids(failed_since=start, status=RunStatus.PENDING) == []
        assert await ids(failed_since=start, workflow="refund") == []
        assert await ids(failed_since=start, until=runs[5].created_at) == [runs[2].run_id]
        later = time.time() + 60
        assert (await store.attention_counts(self.app, failed_since=later)).failed_since == 0
        assert await ids(failed_since=later) == []
        await store.retry_run(self.app, runs[2].run_id, include_compensated=False,
                              version=None, actor="token:ann", now=time.time())
        assert (await store.attention_counts(self.app, failed_since=start)).failed_since == 1
        assert await ids(failed_since=start) == [runs[7].run_id]
        await store.commit_run(self.app, runs[2].run_id, 0, RunWrite(
            status=RunStatus.FAILED, error="E: again", release=True))  # failed again
        assert (await store.attention_counts(self.app, failed_since=start)).failed_since == 2

    async def test_operator_actions_are_chained_into_the_audit_log(self, store: Store) -> None:
        assert await store.audit_head_seq(self.app) == 0
        run, _ = await store.create_run(new_run(self.app))
        assert await store.audit_head_seq(self.app) == 1
        await store.record_action(self.app, "token:alice", "run.started", run.run_id,
                                  {"workflow": "wf"})
        records = await store.audit_records(self.app)
        assert [(r.actor, r.action, r.target) for r in records][-1] == (
            "token:alice", "run.started", run.run_id)
        assert json.loads(records[-1].data) == {"workflow": "wf"}
        assert (await store.verify_audit(self.app)).ok
        assert await store.audit_head_seq(self.app) == records[-1].seq == 2

    async def test_operator_actions_keep_a_keyed_chain_verifiable(self, store: Store) -> None:
        key = AuditKey("console-contract-key-0123456789")
        store.set_audit_key(self.app, key)
        run, _ = await store.create_run(new_run(self.app))
        await store.record_action(self.app, "token:bob", "run.started", run.run_id, {})
        await store.request_cancel(self.app, run.run_id, actor="token:bob")
        assert (await store.verify_audit(self.app, key=key)).ok
        assert not (await store.verify_audit(self.app, key=AuditKey("another-key-0123456789"))).ok

    async def test_tokens_created_and_revoked_are_audited_in_each_app(
        self, store: Store
    ) -> None:
        name = f"ops-{codec.new_id()[-8:]}"
        apps = [self.app, f"{self.app}-b"]
        who = "cli:ann@host"
        token = TokenRecord(name, Role.ADMIN, hash_token(new_token()), 1.0)
        await store.create_token(token, actor=who, apps=apps)
        with pytest.raises(TokenExists):  # refused: nothing recorded
            await store.create_token(token, actor=who, apps=apps)
        assert await store.revoke_token(name, 2.0, actor="cli:bo@host", apps=apps)
        assert not await store.revoke_token(name, 3.0, actor=who, apps=apps)  # none active
        for app in apps:
            records = await store.audit_records(app)
            assert [(r.actor, r.action, r.target, json.loads(r.data)) for r in records] == [
                (who, "token.created", name, {"role": "admin"}),
                ("cli:bo@host", "token.revoked", name, {}),
            ]
            assert (await store.verify_audit(app)).ok
        assert await store.audit_records(f"{self.app}-c") == []  # not named: untouched
        # Without apps (a library call that names none): stored, recorded nowhere.
        other = TokenRecord(f"{name}-2", Role.VIEWER, hash_token(new_token()), 4.0)
        await store.create_token(other)
        assert await store.revoke_token(other.name, 5.0)
        assert len(await store.audit_records(self.app)) == 2

    async def test_tokens_keep_only_a_hash_and_can_be_revoked(self, store: Store) -> None:
        name = f"ops-{codec.new_id()[-8:]}"  # tokens are store-wide: a name of this test's own
        secret = new_token()
        await store.create_token(TokenRecord(name, Role.OPERATOR, hash_token(secret), 1.0))
        found = await store.token_by_hash(hash_token(secret))
        assert found == TokenRecord(name, Role.OPERATOR, hash_token(secret), 1.0)
        assert found.active and secret not in repr(found)
        assert await store.token_by_hash(hash_token(secret + "x")) is None
        assert name in [t.name for t in await store.tokens()]
        with pytest.raises(TokenExists, match=name):
            await store.create_token(TokenRecord(name, Role.ADMIN, hash_token(new_token()), 2.0))
        assert await store.revoke_token(name, 3.0)
        assert not await store.revoke_token(name, 4.0)
        revoked = await store.token_by_hash(hash_token(secret))
        assert revoked is not None and revoked.revoked_at == 3.0 and not revoked.active
        # A new token may take a revoked token's name; the old secret stays dead.
        fresh = new_token()
        await store.create_token(TokenRecord(name, Role.VIEWER, hash_token(fresh), 5.0))
        assert await store.token_by_hash(hash_token(secret)) is None
        again = await store.token_by_hash(hash_token(fresh))
        assert again is not None and again.role == Role.VIEWER and again.active
