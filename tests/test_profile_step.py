"""bench/profile_step.py: MindSpore's profiler around real ds2exp Trainer steps, read back per op type."""
from bench import profile_step


def test_profile_reads_every_op_type_per_step(tmp_path):
    rows = profile_step.profile("ds2_tiny", 2, 60, 1, str(tmp_path))
    ops = {op: (ms, calls) for op, ms, calls in rows}
    # the fast layers' host kernels run as Custom ops, the input projections as MatMul, the loss as CTC
    assert {"Custom", "MatMul", "CTCLossV2"} <= set(ops)
    assert all(ms >= 0 and calls > 0 for ms, calls in ops.values())
    assert [r[1] for r in rows] == sorted((r[1] for r in rows), reverse=True)
