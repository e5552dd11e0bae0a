"""Session-wide guard: a run that leaves test state behind fails, whatever else passed.

Test state: /tmp/nwt-* roots, nwt-* namespaces, and labs named test<hex> (nwl-test*)."""
import glob
import os
import subprocess

import pytest


def leftovers() -> list[str]:
    found = []
    netns = os.listdir("/run/netns") if os.path.isdir("/run/netns") else []
    found += [f"namespace {n}" for n in netns if n.startswith(("nwt-", "nwl-test"))]
    with open("/proc/self/mountinfo") as f:
        found += [f"mount {l.split()[4]}" for l in f
                  if " nsfs " in l and ("/nwt-" in l or "/netweft-lab/test" in l)]
    found += [f"directory {d}" for d in glob.glob("/tmp/nwt-*") + glob.glob("/run/netweft-lab/test*")]
    procs = subprocess.run(["pgrep", "-af", "netweftd|netweft.runtime.supervisor"], capture_output=True,
                           text=True).stdout.splitlines()
    found += [f"process {p}" for p in procs if "/tmp/nwt-" in p or "/netweft-lab/test" in p]
    return found


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session, exitstatus):
    if os.environ.get("NETWEFT_SKIP_LEAK_CHECK"):
        return
    left = leftovers()
    if left:
        print("\nLEAKED STATE after the test run (a cleanup has a hole):\n  " + "\n  ".join(left[:20]))
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
