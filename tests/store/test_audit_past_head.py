"""Records past the chain head: tampering, unless an append moved the head meanwhile."""

from __future__ import annotations

from cantata.model.records import AuditRecord, AuditReport
from cantata.store import audit


def chain(n: int) -> list[AuditRecord]:
    records: list[AuditRecord] = []
    for i in range(n):
        head = (records[-1].seq, records[-1].hash) if records else None
        records.append(audit.next_record(head, 1.0 + i, "system", "run.created", f"r{i}", {}))
    return records


async def verify(records: list[AuditRecord], recorded: int, now: int) -> AuditReport:
    """Verify with the head at ``recorded`` when first read, at ``now`` when read again."""

    async def fetch(after: int) -> list[AuditRecord]:
        return [r for r in records if r.seq > after]

    async def reread() -> tuple[int, str]:
        return now, records[now - 1].hash

    async def unaudited() -> tuple[list[str], list[str]]:
        return [], []

    return await audit.verify_all(
        fetch, (recorded, records[recorded - 1].hash), subject="app 'a'", key=None,
        exported=None, unaudited=unaudited, reread=reread,
    )


async def test_a_record_still_past_the_head_is_reported() -> None:
    report = await verify(chain(5), recorded=3, now=3)
    assert (report.ok, report.first_bad_seq, report.records) == (False, 4, 3)
    assert report.reason is not None and "lies past the chain's head (#3)" in report.reason


async def test_records_appended_while_verifying_are_not_tampering() -> None:
    assert await verify(chain(5), recorded=3, now=5) == AuditReport(True, 3)


async def test_only_the_records_past_the_moved_head_are_reported() -> None:
    report = await verify(chain(6), recorded=3, now=4)
    assert (report.ok, report.first_bad_seq) == (False, 5)
