"""Freed host memory is reused: once the heap has grown, large temporaries cost no page faults."""

import os
import subprocess
import sys

import pytest

PROBE = r"""
import resource, sys, torch
from nemo_minitron.runtime.host_alloc import keep_freed_memory
print(keep_freed_memory())
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
late = 0
for i in range(15):  # a step's temporaries: 64 MiB (above glibc's largest mmap threshold) and more
    before = faults()
    x = torch.ones(16 << 20)
    y = torch.ones((3 if i % 2 else 5) << 20)
    if i >= 10:  # the heap has grown to the steps' size by now (it takes up to ~7 steps)
        late += faults() - before
    del x, y
print(late)
"""


def _probe(**env) -> tuple[str, int]:
    full = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    full.update(env)
    out = subprocess.run([sys.executable, "-c", PROBE], env=full, capture_output=True,
                         text=True, check=True).stdout.split("\n")
    return out[0], int(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_second_allocation_reuses_pages():
    said, faults = _probe()
    assert said == "kept for reuse"
    assert faults < 1000, faults  # 5 steps of >= 64 MiB: 16384 pages of 4 KiB each
    said, faults = _probe(NEMO_MINITRON_MALLOC="default")
    assert said == "left as it is: NEMO_MINITRON_MALLOC=default"
    assert faults > 5 * 16000, faults  # glibc's default: fresh mmaps, every page faulted again


def test_user_settings_win():
    said, _ = _probe(MALLOC_ARENA_MAX="2")
    assert said == "left as it is: the environment sets malloc's own options"


def test_a_mistyped_choice_is_one_line_before_any_work():
    env = dict(os.environ, NEMO_MINITRON_MALLOC="off")
    run = subprocess.run([sys.executable, "-m", "nemo_minitron", "evaluate"], env=env,
                         capture_output=True, text=True)
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == [
        "minitron evaluate: error: NEMO_MINITRON_MALLOC='off': use keep (freed memory reused, "
        "the default) or default (glibc's own behaviour)"]
