"""openaff.cpu_memory: keeping freed memory removes the page faults of repeated large allocations."""

import subprocess
import sys

import pytest

from openaff import cpu_memory

# 64 MiB blocks: above glibc's largest dynamic mmap threshold (32 MiB), so by default each one is a
# fresh mapping whose 16 384 pages fault when written.
_PROBE = """
import statistics, sys, torch
from openaff import cpu_memory
if sys.argv[1] == "retain":
    assert cpu_memory.retain_freed_memory()
faults = []
for _ in range(10):
    f0 = cpu_memory.minor_page_faults()
    t = torch.empty(16 * 2**20); t.fill_(1); del t
    faults.append(cpu_memory.minor_page_faults() - f0)
print(statistics.median(faults[2:]))  # the heap settles after a block or two
"""


def _faults_per_alloc(mode: str) -> float:
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, check=True)
    return float(out.stdout.strip())


@pytest.mark.skipif(cpu_memory._glibc() is None, reason="mallopt settings exist in glibc only")
def test_retain_removes_the_page_faults_of_reused_blocks():
    system, retain = _faults_per_alloc("system"), _faults_per_alloc("retain")
    assert system > 8000  # most of the block's 16 384 pages, every time
    assert retain < system / 20


def test_retain_reports_whether_it_applied():
    # Run in a child: the settings are process-wide and last until the process ends.
    code = "from openaff import cpu_memory; print(cpu_memory.retain_freed_memory())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == str(cpu_memory._glibc() is not None)
    assert cpu_memory.minor_page_faults() >= 0


def test_apply_cpu_alloc_records_what_the_run_got(monkeypatch):
    calls = []
    monkeypatch.setattr(cpu_memory, "retain_freed_memory", lambda: calls.append(1) or False)
    assert cpu_memory.apply_cpu_alloc("retain", "cuda") is None and not calls
    assert cpu_memory.apply_cpu_alloc("system", "cpu") == "system" and not calls
    assert cpu_memory.apply_cpu_alloc("retain", "cpu") == "system (retain not available: not glibc)"
    monkeypatch.setattr(cpu_memory, "retain_freed_memory", lambda: True)
    assert cpu_memory.apply_cpu_alloc("retain", "cpu") == "retain"
