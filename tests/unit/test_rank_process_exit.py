"""A rank's process must end without its gloo threads being torn down in interpreter exit.

CI saw FSDP2 ranks abort after a finished run ("terminate called without an active exception", SIGABRT):
torch 2.13 keeps process groups alive past destroy_process_group (the first import of torch._dynamo after
the group exists takes references to it; DTensor's sharding caches hold DeviceMeshes that hold it), and a
leaked gloo backend torn down during exit aborts a rank whose peer is still closing. The join path imports
torch._dynamo first and collects before destroying (device.before_process_group / end_process_group); the
CLI's rank processes end with end_rank_process, which skips teardown after flushing."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from dist_lowrank.multiproc import free_port

ROOT = Path(__file__).resolve().parents[2]

_JOIN = """
import gc, glob, json, sys
gc.disable()  # an automatic pass might free the cycle below at any time; this shows what end_process_group does
import torch, torch.distributed as dist
if sys.argv[1] == "ours":
    from dist_lowrank.device import end_process_group
    from dist_lowrank.train.launch_local import init_process_group
    init_process_group()
else:
    end_process_group = dist.destroy_process_group
    dist.init_process_group("gloo")
import torch.distributed._functional_collectives as funcol
funcol.all_reduce(torch.ones(4), "sum", dist.group.WORLD).wait()  # what DTensor.full_tensor() runs
torch.optim.AdamW([torch.nn.Parameter(torch.ones(2))])  # imports torch._dynamo lazily
engine = {"group": dist.group.WORLD}  # an engine holding the group, in a reference cycle (hooks make them)
engine["self"] = engine
del engine  # now only the collector can free it, and the group with it
end_process_group()
print(json.dumps(sorted(open(p).read().strip() for p in glob.glob("/proc/self/task/*/comm"))))
"""

_END = """
import sys
from dist_lowrank.train.launch_local import end_rank_process
print("written before the end", end="")  # buffered: a pipe is not a terminal
sys.stderr.write("and to stderr")
end_rank_process(3)
"""


def _python(script: str, *args: str) -> subprocess.CompletedProcess:
    env = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port()), "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, "-c", script, *args], env=env, capture_output=True, text=True, timeout=120)


def _gloo_threads_after_destroy(how: str) -> list[str]:
    proc = _python(_JOIN, how)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [name for name in json.loads(proc.stdout.strip().splitlines()[-1]) if "gloo" in name]


def test_the_join_path_ends_the_gloo_threads_with_destroy_process_group() -> None:
    assert _gloo_threads_after_destroy("plain"), "control: torch no longer leaks the group; drop the workaround"
    assert _gloo_threads_after_destroy("ours") == []


def test_end_rank_process_keeps_what_was_written_and_the_exit_code() -> None:
    proc = _python(_END)
    assert (proc.returncode, proc.stdout, proc.stderr) == (3, "written before the end", "and to stderr")
