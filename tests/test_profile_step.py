"""bench/profile_step.py: MindSpore's profiler around real ds2exp Trainer steps, read back per op type. In its own
process, as make bench runs it: the profiler and the device set-up belong to a fresh MindSpore runtime."""
import subprocess
import sys

from ds2exp.config import project_root


def test_profile_prints_every_op_type_per_step():
    out = subprocess.run([sys.executable, "-m", "bench.profile_step", "--batch", "2", "--frames", "60", "--steps", "1"],
                         cwd=project_root(), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = {}
    for line in out.stdout.splitlines()[2:-1]:  # after the title and the header, before the total
        op, ms, calls, share = line.split()
        rows[op] = (float(ms), float(calls), float(share.rstrip("%")))
    # the fast layers' host kernels run as Custom ops, the input projections as MatMul, the loss as CTC
    assert {"Custom", "MatMul", "CTCLossV2"} <= set(rows)
    assert all(ms >= 0 and calls > 0 for ms, calls, _ in rows.values())
    times = [v[0] for v in rows.values()]
    assert times == sorted(times, reverse=True)
    assert out.stdout.splitlines()[-1].startswith("all ops")
