"""Where a sampled daemon spent its time: the functions most often on a busy stack (inclusive), from a file
written by bench/sampler/sitecustomize.py. Stacks of threads waiting for work (the event loop in select, an
idle executor thread) are left out.

    python bench/samples_top.py FILE [--top 40] [--filter netweft/]
"""
from __future__ import annotations

import argparse
from collections import Counter

IDLE_LEAVES = ("select (selectors.py", "wait (threading.py", "_worker (thread.py", "_sample (sitecustomize.py")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("file")
    p.add_argument("--top", type=int, default=40)
    p.add_argument("--filter", default="", help="only functions whose file:line contains this")
    args = p.parse_args()
    inclusive, total, busy = Counter(), 0, 0
    with open(args.file) as f:
        for line in f:
            if line.startswith("#"):
                print(line.strip())
                continue
            stack, n = line.rsplit(" ", 1)
            n = int(n)
            total += n
            frames = stack.split(";")
            if frames[-1].startswith(IDLE_LEAVES) or frames[-1].startswith("get (queue.py"):
                continue
            busy += n
            for fr in set(frames[1:]):
                inclusive[fr] += n
    print(f"{busy} busy samples of {total}")
    shown = 0
    for fr, n in inclusive.most_common():
        if args.filter in fr:
            print(f"{n:7d} {100 * n / max(busy, 1):5.1f}%  {fr}")
            shown += 1
            if shown >= args.top:
                break


if __name__ == "__main__":
    main()
