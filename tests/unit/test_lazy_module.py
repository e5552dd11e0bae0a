"""netweft.daemon.memory.lazy_module: a module whose code runs on first use; one malloc arena is harmless."""
import os
import subprocess
import sys

import pytest

from netweft.daemon import memory


def run(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          env={**os.environ, "PYTHONPATH": os.getcwd()}).stdout.strip()


def test_code_runs_on_first_attribute_access():
    out = run("import sys; from netweft.daemon.memory import lazy_module; "
              "c = lazy_module('netweft.manager.cluster'); "
              "before = 'netweft.manager.watch' in sys.modules; "
              "m = c.Manager; "
              "print(before, 'netweft.manager.watch' in sys.modules, m.__module__, "
              "sys.modules['netweft.manager.cluster'] is c)")
    assert out == "False True netweft.manager.cluster True"


def test_a_loaded_module_is_given_as_it_is():
    assert memory.lazy_module("os") is os


def test_an_unknown_module_is_refused_at_once():
    with pytest.raises(ImportError, match="no module named 'netweft.no_such_thing'"):
        memory.lazy_module("netweft.no_such_thing")


def test_tune_malloc_then_threads_still_allocate():
    out = run("import threading; from netweft.daemon import memory; memory.tune_malloc(); "
              "r = []; t = threading.Thread(target=lambda: r.append(len(bytearray(1 << 20)))); "
              "t.start(); t.join(); print(r)")
    assert out == "[1048576]"
