"""The Mermaid map of a declarative saga: stages, parallel branches and compensations.

A saga's map comes from its declaration alone, so it is the same whichever mode the
saga is deployed in (and whichever mode its runs started in).
"""

from __future__ import annotations

from typing import Any

from .graph import COMPENSATION, STEP, FlowItem, _shape, label


def is_saga(spec: Any) -> bool:
    """True for a declarative saga's spec (it has stages)."""
    return bool(getattr(spec, "stages", None))


def saga_items(spec: Any) -> list[FlowItem]:
    """The saga's steps in declaration order; branches of a ``Parallel`` are noted."""
    out = []
    for stage in spec.stages:
        note = f"parallel {stage.name}" if stage.parallel else ""
        for step in stage.steps:
            out.append(FlowItem(STEP, step.name, step.compensation, note))
    return out


def saga_mermaid(spec: Any) -> str:
    """A ``flowchart TD`` of the saga: the forward path, and what each failure undoes."""
    name = spec.name
    lines = ["flowchart TD",
             f"    %% workflow {name} — declared saga (one map in both modes: orchestrated, "
             "choreographed)",
             f"    start([{label(name)}])"]
    node: dict[str, str] = {}
    comp: dict[str, str] = {}
    prev = ["start"]
    joins: dict[int, str] = {}
    k = 0
    for stage in spec.stages:
        ids = []
        for step in stage.steps:
            k += 1
            node[step.name] = f"n{k}"
            ids.append(f"n{k}")
            lines.append(f"    {_shape(f'n{k}', FlowItem(STEP, step.name))}")
            if step.compensation is not None:
                comp[step.name] = f"c{k}"
        for p in prev:
            for i in ids:
                lines.append(f"    {p} --> {i}")
        if stage.parallel:
            join = f"j{stage.index + 1}"
            joins[stage.index] = join
            lines.append(f"    {join}(({label('all of ' + stage.name)}))")
            for i in ids:
                lines.append(f"    {i} --> {join}")
            prev = [join]
        else:
            prev = ids
    for p in prev:
        lines.append(f"    {p} --> finish([{label('completed')}])")
    if not comp:
        return "\n".join(lines) + "\n"
    for step in spec.steps:
        if step.name in comp:
            item = FlowItem(COMPENSATION, step.compensation)
            lines.append(f"    {_shape(comp[step.name], item)}")
    lines.append(f"    undone([{label('compensated')}])")
    fails = label("fails")
    for stage in spec.stages:
        tail = spec.undo_before(stage)
        first = comp[tail[0]] if tail else None
        if stage.parallel:
            join = joins[stage.index]
            for step in stage.steps:
                lines.append(f"    {node[step.name]} -.->|{fails}| {join}")
            own = [comp[s.name] for s in reversed(stage.steps) if s.name in comp]
            target = own[0] if own else first
            if target is not None:
                lines.append(f"    {join} -.->|{label('a branch failed')}| {target}")
            if own:  # the stage's own compensations, then those before it
                for a, b in zip(own, [*own[1:], first or "undone"], strict=True):
                    lines.append(f"    {a} -.-> {b}")
        elif first is not None:
            lines.append(f"    {node[stage.steps[0].name]} -.->|{fails}| {first}")
    order = spec.undo_before(spec.stages[-1]) if len(spec.stages) > 1 else []
    last_stage = spec.stages[-1]
    if not last_stage.parallel and last_stage.steps[0].name in comp:
        order = [last_stage.steps[0].name, *order]
    chain = [comp[s] for s in order]
    for a, b in zip(chain, [*chain[1:], "undone"], strict=True):
        lines.append(f"    {a} -.-> {b}")
    return "\n".join(dict.fromkeys(lines)) + "\n"
