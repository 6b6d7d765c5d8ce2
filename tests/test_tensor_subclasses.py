"""DTensor and other tensor-subclass arguments (issue 18, point 2): the norms run a DTensor on its local
shards and return a DTensor with x's placements; every op refuses a subclass whose data_ptr() is not its
data with a TypeError naming the argument, never handing that pointer to a kernel. The checks run in
child processes (tests/_dist_subclasses.py under torch.distributed.run, gloo on CPU) so that a crash
fails the test instead of killing pytest."""
import os
import signal
import subprocess
import sys

import pytest
import torch

import fastlayers

HERE = os.path.dirname(os.path.abspath(__file__))
needs_dist = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="torch.distributed with gloo is needed")


def _run(nproc, backends):
    pkg_root = os.path.dirname(os.path.dirname(os.path.abspath(fastlayers.__file__)))  # the fastlayers under test
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join([pkg_root, *filter(None, [os.environ.get("PYTHONPATH")])])}
    env.pop("FASTLAYERS_BACKEND", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           os.path.join(HERE, "_dist_subclasses.py"), *backends]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400, cwd=os.path.dirname(HERE))
    out = p.stdout + p.stderr
    crashed = [s.name for s in (signal.SIGSEGV, signal.SIGBUS, signal.SIGABRT, signal.SIGILL)
               if f"Signal {int(s)}" in out or s.name in out or f"exitcode  : -{int(s)}" in out]
    assert not crashed, f"a worker crashed ({crashed}):\n{out[-4000:]}"
    assert p.returncode == 0, out[-4000:]
    assert p.stdout.rstrip().endswith("done"), out[-4000:]
    return p.stdout


def _backends():
    names = ["cpu", "reference"]
    if fastlayers.available_backends()["triton"][0]:
        names.append("triton")  # run on CPU tensors by the interpreter in the child
    return names


@needs_dist
def test_dtensor_and_wrapper_subclasses_one_process():
    out = _run(1, _backends())
    assert "every op refuses a DTensor" in out and "every op refuses a wrapper subclass" in out
    assert "rms_norm x [Shard(dim=1)], weight dtensor" in out


@needs_dist
def test_dtensor_norm_gradients_two_processes():
    """Two ranks: x sharded over rows, the weight replicated; the weight's gradient is the sum over both
    ranks' rows (a Partial DTensor, or all-reduced into a plain weight), x's stays sharded."""
    out = _run(2, [b for b in _backends() if b != "reference"])
    assert "rms_norm x [Shard(dim=0)], weight plain, 2 rank(s)" in out
