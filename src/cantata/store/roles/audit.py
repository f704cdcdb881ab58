"""The audit log: a hash chain per app (see :mod:`cantata.store.audit`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

from cantata.model.records import (
    AuditRecord,
    AuditReport,
)

if TYPE_CHECKING:
    from cantata.store.audit import AuditKey


class AuditStore(Protocol):
    """Read, key and verify the audit chain; append an operator's action to it."""

    async def audit_records(
        self, app: str, *, after_seq: int = 0, limit: int = 1000
    ) -> list[AuditRecord]:
        """Audit records of ``app`` with ``seq > after_seq``, in ``seq`` order."""

    def set_audit_key(self, app: str, key: AuditKey | None) -> None:
        """Key ``app``'s audit chain from now on (HMAC-SHA256; ``None``: plain). Records
        are written with ``key`` itself; its previous keys only verify."""

    async def audit_head(self, app: str) -> tuple[int, str] | None:
        """``(seq, hash)`` of the last record of ``app``'s chain (``None``: empty)."""

    async def verify_audit(
        self, app: str, *, key: AuditKey | None = None, head: tuple[int, str] | None = None
    ) -> AuditReport:
        """Recompute ``app``'s hash chain, page by page, up to its recorded head.

        Names the first record whose content no longer matches its hash, whose
        link to the previous record is broken, or that is missing (a gap in
        ``seq``, or records gone from the end of the chain) and any record that lies
        past the head (added outside Cantata; the head is read again after the
        records, so an append racing the check is not one). With ``key`` the chain
        must be keyed (after a plain prefix and the records of the key's previous
        keys, oldest first: a rotation); with ``head`` (an exported head) its
        record must still be there, unchanged. Runs without a ``run.created`` record,
        and such records whose run is gone, are reported too.
        """

    async def audit_head_seq(self, app: str) -> int:
        """The ``seq`` of ``app``'s last audit record (0 for none): where a change feed
        that follows the audit log starts."""

    async def record_action(
        self, app: str, actor: str, action: str, target: str, data: dict[str, Any]
    ) -> None:
        """Append an operator action (``actor`` did ``action`` to ``target``) to the audit log."""
