"""The saga's map shows its branches, its join and its compensations, the same in
both modes."""

from __future__ import annotations

from typing import Any

from cantata import App, Parallel, Saga, Step
from cantata.cli.main import main
from cantata.observability.graph import workflow_mermaid

from .test_modes import MODES


def steps(app: App) -> dict[str, Any]:
    """The shop's steps, bodies empty (a map needs their names only)."""
    made = {}
    for name in ("reserve", "release", "stock", "unstock", "fraud", "charge", "refund"):
        async def body(o: dict[str, Any]) -> None: ...

        body.__name__ = body.__qualname__ = name
        made[name] = app.step(body)
    return made


def shop(mode: str) -> App:
    app = App("shop", store="memory://")
    s = steps(app)
    app.include(Saga("order", Step(s["reserve"], compensate=s["release"]),
                     Parallel(Step(s["stock"], compensate=s["unstock"]), Step(s["fraud"]),
                              name="checks"),
                     Step(s["charge"], compensate=s["refund"]), mode=mode))  # type: ignore[arg-type]
    return app


ORCHESTRATED = shop("orchestrated")
CHOREOGRAPHED = shop("choreographed")


async def test_the_map_is_the_same_in_both_modes_with_branches_and_compensations() -> None:
    maps = [await workflow_mermaid(app.router, "shop", "order", None)
            for app in (ORCHESTRATED, CHOREOGRAPHED)]
    assert maps[0] == maps[1]
    text = maps[0]
    for line in (
        'n1["reserve"]', 'n2["stock"]', 'n3["fraud"]', 'n4["charge"]',
        "start --> n1", "n1 --> n2", "n1 --> n3",  # the fork
        'j2(("all of checks"))', "n2 --> j2", "n3 --> j2", "j2 --> n4",  # the join
        'n4 --> finish(["completed"])',
        'c1[/"↩ release"/]', 'c2[/"↩ unstock"/]', 'c4[/"↩ refund"/]',
        'n2 -.->|"fails"| j2', 'n3 -.->|"fails"| j2',
        'j2 -.->|"a branch failed"| c2', "c2 -.-> c1", 'n4 -.->|"fails"| c2',
        "c1 -.-> undone",
    ):
        assert f"    {line}\n" in text, line
    assert "c3" not in text  # fraud has no compensation


def test_cantata_graph_prints_it(capsys: Any) -> None:
    assert main(["graph", "tests.saga.test_map:CHOREOGRAPHED", "order"]) == 0
    out = capsys.readouterr().out
    assert "j2((" in out and "↩ unstock" in out


def test_modes_are_the_two_known() -> None:
    assert MODES == ("orchestrated", "choreographed")


async def test_a_parallel_stage_without_compensations_maps_to_the_ones_before() -> None:
    app = App("shop", store="memory://")
    s = steps(app)
    app.include(Saga("order", Step(s["reserve"], compensate=s["release"]),
                     Parallel(Step(s["stock"]), Step(s["fraud"]), name="checks"),
                     Step(s["charge"])))
    text = await workflow_mermaid(app.router, "shop", "order", None)
    # a failed branch undoes what came before the stage: reserve's release
    for line in ('j2 -.->|"a branch failed"| c1', "c1 -.-> undone"):
        assert f"    {line}\n" in text, (line, text)
