"""A wall-clock stack sampler for the daemon under a benchmark (py-spy is not installed everywhere).

Loaded by every Python process started with this directory on PYTHONPATH and NETWEFT_BENCH_SAMPLES set to a
directory: SIGUSR2 starts sampling every thread's stack (every 2 ms) and the next SIGUSR2 writes the samples,
as collapsed stacks ("thread;outer;...;inner count" lines, as flamegraph tools read them), to
DIR/<pid>-<n>.txt. bench/samples_top.py summarizes such a file.
"""
import os
import signal
import sys
import threading
import time
from collections import Counter

_dir = os.environ.get("NETWEFT_BENCH_SAMPLES")
_state = {"stop": None, "n": 0}


def _sample(stop: threading.Event, counts: Counter) -> None:
    me = threading.get_ident()
    while not stop.wait(0.002):
        names = {t.ident: t.name for t in threading.enumerate()}
        for ident, frame in sys._current_frames().items():
            if ident == me:
                continue
            stack = []
            while frame is not None:
                code = frame.f_code
                stack.append(f"{code.co_name} ({os.path.basename(code.co_filename)}:{code.co_firstlineno})")
                frame = frame.f_back
            counts[names.get(ident, str(ident)) + ";" + ";".join(reversed(stack))] += 1


def _toggle(signum, frame) -> None:
    if _state["stop"] is None:
        stop, counts = threading.Event(), Counter()
        t = threading.Thread(target=_sample, args=(stop, counts), name="nwt-sampler", daemon=True)
        _state.update(stop=stop, counts=counts, thread=t, t0=time.monotonic())
        t.start()
        return
    _state["stop"].set()
    _state["thread"].join()
    _state["n"] += 1
    path = os.path.join(_dir, f"{os.getpid()}-{_state['n']}.txt")
    with open(path, "w") as f:
        f.write(f"# {time.monotonic() - _state['t0']:.3f} s\n")
        for stack, n in _state["counts"].most_common():
            f.write(f"{stack} {n}\n")
    _state["stop"] = None


if _dir and os.path.basename(sys.argv[0] if sys.argv else "") == "netweftd":
    signal.signal(signal.SIGUSR2, _toggle)
