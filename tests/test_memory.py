"""userllm.utils.memory: training loops reuse their freed blocks; ranking returns them (a fresh process each)."""

import subprocess
import sys

import pytest

from userllm.utils import memory

pytestmark = pytest.mark.skipif(memory._mallopt() is None, reason="needs glibc's mallopt")

PROBE = """
import resource, torch
from userllm.utils import memory

def step():                                # a training step's large temporaries: 20, 40 and 64 MB
    a, b = torch.ones(5 << 20), torch.ones(10 << 20)
    c = torch.ones(16 << 20) + a.sum() + b.sum()
    del a, b, c

def faults(warmup=5, steps=3):             # page faults of the last steps, once the heap has settled
    for _ in range(warmup):
        step()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(steps):
        step()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

with memory.varying_shapes():             # a fresh process: every large block is a fresh mmap
    varying = faults()
assert memory.reuse_freed_memory()
reuse = faults()
with memory.varying_shapes():             # an evaluation inside a training run ...
    inside = memory.current_policy()
after = faults()                          # ... leaves the loop's policy in force
print(reuse, varying, after, inside, memory.current_policy())
"""


def test_training_reuses_blocks_ranking_returns_them_and_the_policy_is_restored():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True).stdout.split()
    reuse, varying, after = map(int, out[:3])
    pages = 3 * (124 << 20) // 4096 // 2       # half of the 3 steps' 124 MB
    assert varying >= pages, out               # every block faults in afresh
    assert reuse * 10 <= varying, out          # the settled heap serves the blocks again
    assert after * 10 <= varying, out
    assert out[3:] == ["varying", "reuse"]
