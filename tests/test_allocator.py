"""kinkprop keeps freed memory for reuse (glibc's mallopt), unless KINKPROP_MALLOC=system: a loop
that allocates and frees 40 MB per iteration then runs without page faults."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

CHURN = """
import resource
import numpy as np
import kinkprop

def churn():
    arrays = [np.ones(1 << 20, np.float32) for _ in range(10)]  # 10 x 4 MB, freed together
    return sum(float(a[0]) for a in arrays)

for _ in range(5):
    churn()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    churn()
print(kinkprop.allocator.applied(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""

glibc_only = pytest.mark.skipif(not sys.platform.startswith("linux") or
                                os.confstr("CS_GNU_LIBC_VERSION") is None,
                                reason="mallopt is glibc's")


def _run(setting):
    env = dict(os.environ)
    env.pop("KINKPROP_MALLOC", None)
    if setting is not None:
        env["KINKPROP_MALLOC"] = setting
    out = subprocess.run([sys.executable, "-c", CHURN], env=env, capture_output=True, text=True,
                         check=True, timeout=120)
    applied, faults = out.stdout.split()
    return applied == "True", int(faults), out.stderr


@glibc_only
def test_freed_memory_is_reused_without_page_faults():
    applied, faults, _ = _run(None)
    assert applied
    # 20 x 40 MB re-faulted would be ~200k faults; a few stray ones are allowed
    assert faults < 1000


@glibc_only
def test_system_setting_leaves_the_allocator_alone():
    applied, faults, _ = _run("system")
    assert not applied
    assert faults > 10_000  # glibc's defaults hand the 40 MB back and fault it in again


@glibc_only
def test_unknown_setting_warns_and_keeps_memory():
    applied, _, err = _run("sytem")
    assert applied
    assert "KINKPROP_MALLOC='sytem' is not understood" in err
