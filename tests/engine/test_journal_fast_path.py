"""``Journal.replay_or_begin_now``: a step's call looked up without a coroutine only when
``replay_or_begin`` would await nothing (engine/journal.py); else ``None``, and the
caller awaits ``replay_or_begin`` as before."""

from __future__ import annotations

from cantata.engine.journal import Journal
from cantata.model.records import EntryKind, EntryStatus, HistoryEntry


class _Runtime:
    def __init__(self, cancel: bool = False) -> None:
        self.cancel = cancel
        self.new_calls: list[str] = []

    def cancel_pending(self) -> bool:
        return self.cancel

    def new_call(self, key: str) -> None:
        self.new_calls.append(key)


def _journal(rt: _Runtime, *entries: HistoryEntry) -> Journal:
    journal = Journal(rt)  # type: ignore[arg-type]
    journal.load(entries)
    return journal


def test_a_new_call_with_everything_replayed_is_begun_at_once() -> None:
    rt = _Runtime()
    call = _journal(rt).replay_or_begin_now(EntryKind.STEP, "a", "a#1", True)
    assert call is not None and call.key == "a#1" and call.entry is None
    assert rt.new_calls == ["a#1"]  # the new-call check ran


def test_a_new_call_with_recorded_calls_not_replayed_awaits() -> None:
    rt = _Runtime()
    done = HistoryEntry("b#1", EntryKind.STEP, "b", EntryStatus.COMPLETED, seq=1)
    journal = _journal(rt, done)
    assert journal.replay_or_begin_now(EntryKind.STEP, "a", "a#1", True) is None
    assert rt.new_calls == []  # left to check_new_call, which gives siblings their turns
    # a compensation (no check) is looked up at once
    assert journal.replay_or_begin_now(EntryKind.COMPENSATION, "c", "c#1", False) is not None


def test_a_pending_cancel_awaits() -> None:
    rt = _Runtime(cancel=True)
    assert _journal(rt).replay_or_begin_now(EntryKind.STEP, "a", "a#1", True) is None
    assert rt.new_calls == []


def test_a_recorded_call_in_flight_awaits_and_a_final_one_replays() -> None:
    rt = _Runtime()
    running = HistoryEntry("a#1", EntryKind.STEP, "a", EntryStatus.RUNNING, seq=1)
    done = HistoryEntry("b#1", EntryKind.STEP, "b", EntryStatus.COMPLETED, seq=2)
    journal = _journal(rt, running, done)
    assert journal.replay_or_begin_now(EntryKind.STEP, "a", "a#1", True) is None
    call = journal.replay_or_begin_now(EntryKind.STEP, "b", "b#1", True)
    assert call is not None and call.entry is done
    assert rt.new_calls == []
