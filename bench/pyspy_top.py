"""Summarise a py-spy ``--format raw`` file: the top functions by own and total time.

    python -m bench.pyspy_top FILE.raw [--top 15] [--exclude SUBSTR ...] [--lines]

Self = samples where the function is the innermost frame; total = samples where it is
anywhere on the stack. Stacks through an import (``_find_and_load``) are left out by
default, so start-up does not blur the steady state. Samples per thread are listed
first when the file was recorded with ``--threads``.
"""

from __future__ import annotations

import argparse
import re
from collections import Counter

_LINE = re.compile(r":\d+\)$")


def parse(path: str, exclude: list[str], lines: bool) -> list[tuple[list[str], int]]:
    stacks = []
    with open(path, errors="replace") as f:  # frames may hold bytes of any encoding
        for raw in f:
            raw = raw.rstrip("\n")
            if not raw:
                continue
            stack, _, count = raw.rpartition(" ")
            if not count.isdigit():  # the rest of a frame name that held a line break
                continue
            if any(x in stack for x in exclude):
                continue
            frames = stack.split(";")
            if not lines:
                frames = [_LINE.sub(")", fr) for fr in frames]
            stacks.append((frames, int(count)))
    return stacks


def summary(path: str, top: int = 15, exclude: list[str] | None = None,
            lines: bool = False) -> str:
    stacks = parse(path, exclude if exclude is not None else ["_find_and_load"], lines)
    total = sum(c for _, c in stacks) or 1
    threads: Counter[str] = Counter()
    own: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    for frames, c in stacks:
        body = frames
        if frames and frames[0].startswith(("thread ", "process ")):
            threads[frames[0]] += c
            body = frames[1:]
        if body:
            own[body[-1]] += c
        for fr in set(body):
            incl[fr] += c
    out = [f"{path}: {total} samples"]
    if threads:
        out.append("\nsamples per thread:")
        out += [f"  {c / total:6.1%}  {t}" for t, c in threads.most_common()]
    out.append(f"\ntop {top} by own time (innermost frame):")
    out += [f"  {c / total:6.1%}  {fr}" for fr, c in own.most_common(top)]
    out.append(f"\ntop {top} by total time (anywhere on the stack):")
    out += [f"  {c / total:6.1%}  {fr}" for fr, c in incl.most_common(top)]
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("file")
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--exclude", action="append", default=None,
                    help="leave out stacks containing this text (default: _find_and_load)")
    ap.add_argument("--lines", action="store_true", help="keep line numbers (per line)")
    a = ap.parse_args()
    print(summary(a.file, a.top, a.exclude, a.lines))


if __name__ == "__main__":
    main()
