"""What the console reads, and its API tokens (docs/console.md)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from cantata.model.access import AttentionCounts, RunQuery, TokenRecord
from cantata.model.records import (
    RunRecord,
)


class ConsoleStore(Protocol):
    """Pages of runs, counts by status and API tokens (docs/console.md)."""

    async def query_runs(self, app: str, query: RunQuery) -> list[RunRecord]:
        """One page of runs matching ``query``, newest first: ordered by ``created_at``
        then ``run_id``, both descending, starting after ``query.after``."""

    async def count_runs(self, app: str) -> dict[str, int]:
        """How many runs of ``app`` have each status (statuses with none are absent)."""

    async def attention_counts(self, app: str, *, failed_since: float) -> AttentionCounts:
        """How many dead letters ``app`` has, and how many of its runs are ``failed``
        and failed at or after ``failed_since`` (POSIX seconds; whenever they were
        created: what ``query_runs`` lists with ``RunQuery(failed_since=...)``): each
        read by an index (the dead letters' key, the failed runs' ``runs_failed``), in
        time bounded by the counts, not by the app's runs."""

    async def create_token(
        self, token: TokenRecord, *, actor: str = "system", apps: Sequence[str] = ()
    ) -> None:
        """Store an API token (its hash), replacing a revoked token of the same name.

        Audited as ``token.created`` by ``actor`` (data: the role) in the chain of each
        app of ``apps`` (a token opens every app of the store: those it holds), in the
        same transaction.

        Raises:
            TokenExists: an active token has that name (nothing is recorded).
        """

    async def token_by_hash(self, token_hash: str) -> TokenRecord | None:
        """The token (active or revoked) whose secret hashes to ``token_hash``."""

    async def tokens(self) -> list[TokenRecord]:
        """Every token, active and revoked, by name."""

    async def revoke_token(
        self, name: str, now: float, *, actor: str = "system", apps: Sequence[str] = ()
    ) -> bool:
        """Revoke the active token ``name``; ``False`` when there is none (nothing is
        recorded). Audited as ``token.revoked`` by ``actor`` in the chain of each app of
        ``apps``, in the same transaction."""
