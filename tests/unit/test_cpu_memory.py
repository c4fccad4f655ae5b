"""`parallel.keep_cpu_memory` (glibc keeps freed memory for the next step) and the ZeRO
gradient bucket sized to the stage (`train.deepspeed_config`): the two fixes of issue 13 that
stop a CPU step from handing its large temporaries back to the kernel and faulting them in
again every step (docs/performance.md).

The allocator is checked in fresh subprocesses, since mallopt changes the whole process: under
glibc's defaults a freed 64 MiB tensor leaves the resident set at once (it was a mapping of its
own), after `keep_cpu_memory` it stays in the process, and a smaller tensor allocated right
after comes back from the freed block, without new page faults. (A block of exactly the freed
size is not always reused: torch's 64-byte-aligned allocation asks glibc for a little more, and
a small allocation in between can take the rest of the freed block.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from stable_megatron.config import config_from_dict
from stable_megatron.train import DS_REDUCE_BUCKET, deepspeed_config

MIB = 1 << 20

_PROBE = """
import json, resource, torch
from stable_megatron.parallel import keep_cpu_memory

def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096

def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

applied = keep_cpu_memory()
x = torch.ones(16 << 20)          # 64 MiB, touched
held = rss()
del x
released = held - rss()           # how much of it the kernel got back
before = faults()
y = torch.ones(12 << 20)          # 48 MiB, right after the free: fits in the freed block
refaulted = faults() - before
print(json.dumps({"applied": applied, "released": released, "refaulted": refaulted}))
"""


def _probe(malloc: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "STABLE_MEGATRON_MALLOC"}
    if malloc is not None:
        env["STABLE_MEGATRON_MALLOC"] = malloc
    out = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True,
                         text=True, timeout=120, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_memory_stays_in_the_process_for_the_next_allocation():
    default, kept = _probe("default"), _probe(None)
    assert default["applied"] is False and kept["applied"] is True
    pages = 48 * MIB // 4096  # of the second tensor
    # glibc's defaults: the block was its own mapping, unmapped on free and faulted in anew
    assert default["released"] > 60 * MIB and default["refaulted"] > 0.9 * pages, default
    # kept: nothing goes back to the kernel, and the next block reuses the resident pages
    assert kept["released"] < 4 * MIB and kept["refaulted"] < 0.1 * pages, kept


def test_zero_bucket_is_the_stage_size_capped_at_deepspeeds_default():
    cfg = config_from_dict({})
    zero = deepspeed_config(cfg, 1, 12_345)["zero_optimization"]
    assert zero == {"stage": cfg.parallel.zero_stage, "reduce_bucket_size": 12_345}
    big = deepspeed_config(cfg, 2, 3 * DS_REDUCE_BUCKET)["zero_optimization"]
    assert big["reduce_bucket_size"] == DS_REDUCE_BUCKET == 500_000_000
