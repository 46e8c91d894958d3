"""One DeepSpeech2 training step, four ways, side by side in one run: ds2exp vs naive MindSpore vs PyTorch.

    .venv/bin/python -m bench.bench_step             # ds2_tiny and ds2_reference (10-15 minutes)
    .venv/bin/python -m bench.bench_step --quick     # ds2_tiny only (about 5 minutes)

Rows (each in its own subprocess, so peak memory and thread settings are isolated):

  ds2exp   a real ``ds2exp.training.trainer.Trainer`` built from the composed Hydra config
           (``setup_mindspore``: blocking launch; fast kernels; Adam; grad_clip 400) and its
           ``train_step``: value_and_grad, numpy gradient checks and per-group norms, clipping,
           optimizer. The step is split into value_and_grad / numpy gradient handling / Adam by
           timing wrappers around ``trainer.grad_fn`` and ``trainer.optimizer``, and value_and_grad
           further by timers around the numpy/numba kernels of the fast layers.
  graph    the same Trainer with ``hardware.mode=graph``: value_and_grad compiled as one MindSpore
           graph (``mindspore.jit``) with the fast layers' Custom ops inside; its own A B B A duel
           with a second PyTorch process, whose steps its PyTorch ratios are taken against.
  naive    what the MindSpore model zoo recipe builds: nn.Conv2d + nn.LSTM (impl="plain"), default
           asynchronous launch, every utterance padded to 1250 frames, batch 1,
           value_and_grad + nn.Adam. Audio s/s counts the real (unpadded) audio of the utterance.
           ds2_reference: one step without warm-up, killed after --naive-timeout seconds (its
           s/step is then a lower bound, and what depends on it a bound).
  pytorch  the same architecture in PyTorch 2.13 fp32 (bench/torch_baseline.py), as many threads
           as the ds2exp row, the same batch.

The ds2exp and PyTorch processes of a model are alive together and take turns, one step at a
time in A B B A order, so that both see the same machine load (the machine may be shared).
Seconds per step = median of the timed steps after warm-up. GFLOP/s = 3 x analytic forward FLOPs
(convolutions, LSTM input and recurrent matrix products, FC; element-wise work not counted) of the
shape actually computed (the naive row's 1250 padded frames included) / s per step, against the
GEMM peak: MindSpore ops.matmul of 2048x2048 float32, best of 5, in this run. Data wait: the
ds2exp Trainer fed by the real ``BatchLoader`` on synth_tiny (if built under data/): share of wall
time spent waiting for the next batch. Memory: ru_maxrss of each row's process (wait4).
Then a thread-scaling section (the ds2exp step on 1 and on 2 threads, alternating, projected to 8
and 16 cores) and the targets, each PASS or MISS. Files: bench/flops.py (shapes, FLOPs, batches),
bench/step_harness.py (the row processes), bench/torch_baseline.py, this file (plan and report).
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import Any, Callable, Dict, List, Optional

from bench.flops import (FRAMES_PER_SECOND, NAIVE_FRAMES, TRAIN_CLEAN_100_HOURS, conv_shapes, epoch_hours,
                         forward_flops, model_arch, rnn_dims, train_flops)
from bench import bench_memory
from bench.host import cores, where
from bench.step_harness import run_child, run_duel

# model -> (batch, frames) of the ds2exp / PyTorch rows
SHAPES = {"ds2_tiny": (16, 300), "ds2_reference": (4, 400)}

TARGET_SPEEDUP = 20.0  # ds2exp audio s/s >= 20 x naive
# ds2exp s/step / PyTorch s/step (median, and fastest vs fastest), per model
TARGET_TORCH_RATIO = {"ds2_tiny": 1.2, "ds2_reference": 1.0}
TARGET_PEAK_SHARE = 0.60  # ds2exp GFLOP/s >= 60 % of the GEMM peak on ds2_reference
TARGET_TWO_THREAD_SPEEDUP = 1.6  # ds2exp ds2_tiny step on 2 threads >= 1.6 x faster than on 1
TARGET_RSS_RATIO = 1.0  # ds2exp peak RSS <= PyTorch's, ds2_reference 8 x 1200 frames
# below this memory read bandwidth (GB/s) the 1-thread duels are reported too: there memory
# bandwidth per core hides what the code costs
SLOW_MEMORY_GBS = 20.0
SCALING_MODEL = "ds2_tiny"
SCALING_STEPS = 4


def check(name: str, value: Optional[float], target: float, higher_is_better: bool, fmt: str,
          lower_bound: bool = False) -> str:
    """One target line. lower_bound: `value` is only known to be at least this (a killed naive step)."""
    if value is None:
        return f"  {name}: n/a (a row failed) ... MISS"
    ok = value >= target if higher_is_better else value <= target
    sign = ">=" if higher_is_better else "<="
    shown = (">" if lower_bound else "") + format(value, fmt)
    verdict = "PASS" if ok else ("MISS (lower bound only)" if lower_bound else "MISS")
    return f"  {name}: {shown} (target {sign} {format(target, fmt)}) ... {verdict}"


PATH_LABEL = {"ds2exp": "ds2exp Trainer (fast, blocking)", "graph": "ds2exp Trainer, hardware.mode=graph",
              "naive": "naive zoo (plain, async, pad 1250)", "pytorch": "PyTorch 2.13 fp32"}
DS2EXP_PATHS = ("ds2exp", "graph")  # PYNATIVE, and the step compiled as one graph


def plan(quick: bool, naive_timeout: float = 360.0) -> List[Dict[str, Any]]:
    """The rows, per model: ds2exp and pytorch (run as a duel), then naive.

    Sized to keep `make bench` under 20 minutes on 2 shared cores: the naive rows dominate (a
    Python loop over 1250 frames x every LSTM direction, then its backward). ds2_tiny naive: one
    warm-up and one timed step; ds2_reference naive: one step without warm-up (measured: its first
    and second steps take the same time), killed after `naive_timeout` s."""
    rows = []
    for m in (["ds2_tiny"] if quick else ["ds2_tiny", "ds2_reference"]):
        b, t = SHAPES[m]
        tiny = m == "ds2_tiny"
        steps = 5 if tiny else 3
        rows.append(dict(model=m, path="ds2exp", batch=b, frames=t, padded=t, steps=steps,
                         kw=dict(child="ds2exp", model=m, batch=b, frames=t, warmup=2 if tiny else 1,
                                 data_steps=8 if tiny else 0, gemm_probe=True, threads=cores())))
        rows.append(dict(model=m, path="pytorch", batch=b, frames=t, padded=t, steps=steps,
                         kw=dict(child="torch", model=m, batch=b, frames=t, warmup=2 if tiny else 1,
                                 threads=cores())))
        # its own duel with a second PyTorch process; the graph is compiled during the warm-up
        rows.append(dict(model=m, path="graph", batch=b, frames=t, padded=t, steps=steps,
                         kw=dict(child="ds2exp", mode="graph", model=m, batch=b, frames=t, warmup=2 if tiny else 1,
                                 threads=cores())))
        rows.append(dict(model=m, path="naive", batch=1, frames=t, padded=NAIVE_FRAMES, steps=1,
                         timeout=(240 if quick else 300) if tiny else naive_timeout,
                         kw=dict(child="naive", model=m, batch=1, frames=t, pad_to=NAIVE_FRAMES,
                                 warmup=1 if tiny else 0, steps=1)))
    return rows


def _fmt(v: Optional[float], spec: str, width: int, prefix: str = "") -> str:
    return f"{'-' if v is None else prefix + format(v, spec):>{width}s}"


def run(quick: bool = False, out: Callable[[str], None] = print, naive_timeout: float = 360.0) -> Dict[str, Any]:
    t_start = time.perf_counter()
    peak = run_child("peak", timeout=300, steps=5)
    rows = plan(quick, naive_timeout)
    by = {(r["model"], r["path"]): r for r in rows}
    for m in dict.fromkeys(r["model"] for r in rows):
        a, b, nv = by[(m, "ds2exp")], by[(m, "pytorch")], by[(m, "naive")]
        out(f"  ... {m}: ds2exp and PyTorch, {a['steps']} alternating steps each")
        a["res"], b["res"] = run_duel(a["kw"], b["kw"], a["steps"])
        g = by[(m, "graph")]
        out(f"  ... {m}: ds2exp with hardware.mode=graph and PyTorch, {g['steps']} alternating steps each")
        g["res"], g["partner"] = run_duel(g["kw"], b["kw"], g["steps"])
        out(f"  ... {m}: naive (up to {nv['timeout']:.0f} s)")
        nv["res"] = run_child(timeout=nv["timeout"], **nv["kw"])
    peak_end = run_child("peak", timeout=300, steps=5)
    probes = {"start": peak.get("gflops"), "end": peak_end.get("gflops")}
    for r in rows:
        if r["path"] == "ds2exp" and r["res"].get("gemm_gflops"):
            probes[f"after {r['model']} steps"] = r["res"]["gemm_gflops"]
    valid = [v for v in probes.values() if v]
    peak_g = max(valid) if valid else None
    peak["read_gbs"] = max(peak.get("read_gbs") or 0.0, peak_end.get("read_gbs") or 0.0) or float("nan")
    results = {"peak": peak, "peak_probes": probes, "rows": rows}

    # derived figures; a killed naive step gives bounds: s/step > x, audio s/s < y, speed-ups > z
    for r in rows:
        res = r["res"]
        if "error" in res or not (res.get("s") or res.get("lower_bound_s")):
            res.setdefault("error", "no step timed")
            continue
        step = res["s"] if res.get("s") is not None else res["lower_bound_s"]
        r["step"] = step
        r["bound"] = res.get("s") is None
        r["audio_per_s"] = r["batch"] * r["frames"] / FRAMES_PER_SECOND / step
        r["gflops"] = train_flops(model_arch(r["model"]), r["batch"], r["padded"]) / step / 1e9
    for r in rows:
        nv, pt = by.get((r["model"], "naive"), {}), by.get((r["model"], "pytorch"), {})
        r["vs_naive"] = r["audio_per_s"] / nv["audio_per_s"] if r.get("step") and nv.get("step") else None
        r["vs_naive_bound"] = bool(nv.get("bound")) and not r.get("bound")
        r["vs_torch"] = r["step"] / pt["step"] if r.get("step") and pt.get("step") else None
        r["torch_times"] = pt.get("res", {}).get("times")
        partner = r.get("partner")
        if partner is not None:  # the graph row: against the PyTorch process it alternated with
            ok = r.get("step") and partner.get("s") and "error" not in partner
            r["vs_torch"] = r["step"] / partner["s"] if ok else None
            r["torch_times"] = partner.get("times") if ok else None

    out(f"\nTraining step {where()}:")
    out("forward + CTC + backward + Adam (+ the Trainer's gradient checks and clipping); median "
        "s/step after warm-up;\neach row its own process; ds2exp and PyTorch steps alternate (A B B A) so both see "
        "the same load.")
    if peak_g:
        out("GEMM peak (MindSpore ops.matmul 2048x2048 float32, blocking launch; best of 5 at each of: "
            + ", ".join(f"{k} {v:.0f}" for k, v in probes.items() if v)
            + f"): {peak_g:.1f} GFLOP/s; memory read bandwidth {peak['read_gbs']:.1f} GB/s")
    else:
        out(f"GEMM peak: failed ({peak.get('error')})")
    out(f"  {'model':14s} {'path':34s} {'batch':>10s} {'steps':>5s} {'s/step':>9s} {'audio s/s':>9s} "
        f"{'GFLOP/s':>8s} {'% peak':>7s} {'vs naive':>9s} {'vs torch':>8s} {'RSS MiB':>8s} {'load':>5s}")
    for r in rows:
        res = r["res"]
        shape = f"{r['batch']}x{r['frames']}" + ("" if r["padded"] == r["frames"] else f"/{r['padded']}")
        if "error" in res:
            out(f"  {r['model']:14s} {PATH_LABEL[r['path']]:34s} {shape:>10s}  failed: {res['error']}")
            continue
        up, lo = ("<", ">") if r["bound"] else ("", "")
        pct = 100 * r["gflops"] / peak_g if peak_g else None
        out(f"  {r['model']:14s} {PATH_LABEL[r['path']]:34s} {shape:>10s} {len(res['times']) or 1:5d} "
            f"{_fmt(r['step'], '.3f', 9, lo)} {_fmt(r['audio_per_s'], '.3f', 9, up)} "
            f"{_fmt(r['gflops'], '.1f', 8, up)} {_fmt(pct, '.1f', 6, up)}% "
            f"{_fmt(r['vs_naive'], '.1f', 8, '>' if r['vs_naive_bound'] else up)}x "
            f"{_fmt(r['vs_torch'], '.2f', 7, lo)}x {res['max_rss_mib']:8.0f} {res['load']:5.1f}")
    out("  batch = utterances x frames (10 ms each), /1250 = padded frames computed; audio s/s counts real audio;")
    out("  GFLOP/s = 3 x analytic forward FLOPs of the computed shape / s; RSS = peak resident memory of the row's")
    out(f"  process; load = 1-minute load average when the row ended ({cores()} cores); ds2exp and PyTorch on "
        f"{cores()} threads.")
    for r in rows:
        res = r["res"]
        if "error" in res:
            continue
        if r["path"] == "naive":
            if r["bound"]:
                out(f"  {r['model']} naive: ONE step{', no warm-up,' if res.get('first') else ''} killed after "
                    f"{res['lower_bound_s']:.0f} s unfinished (row timeout {res['timed_out']:.0f} s): s/step is a "
                    f"lower bound")
            elif not res.get("warmup_s"):
                out(f"  {r['model']} naive: 1 step timed, no warm-up (too slow for more): "
                    f"{', '.join(f'{t:.1f}' for t in res['times'])} s")
            else:
                out(f"  {r['model']} naive: warm-up step {res['warmup_s']:.1f} s, then "
                    f"{', '.join(f'{t:.1f}' for t in res['times'])} s")
        else:
            out(f"  {r['model']} {r['path']}: steps {', '.join(f'{t:.2f}' for t in res['times'])} s"
                + (f"; {res['params']:,} parameters; torch's own 2048^2 GEMM {res['gemm_gflops']:.1f} GFLOP/s"
                   if r["path"] == "pytorch" else ""))

    _print_profile(rows, by, peak, out)

    # data wait
    tiny = by.get(("ds2_tiny", "ds2exp"), {}).get("res", {})
    d = tiny.get("data") if "error" not in tiny else None
    out(f"\nData wait {where()} (ds2exp Trainer, ds2_tiny, real BatchLoader on synth_tiny, shuffled epoch, "
        "feature cache):")
    if not d or d.get("error") or d.get("share") is None:
        out(f"  n/a ({(d or {}).get('error', 'not measured')})")
    else:
        out(f"  {100 * d['share']:.1f}% of wall time waiting for data over {d['steps']} steps "
            f"({d['step_s']:.3f} s/step, {d['audio_per_s']:.1f} audio s/s, {d['workers']} loader threads); "
            f"first batch (pipeline start) {d['first_wait_s']:.2f} s, left out")

    # epoch projection
    out(f"\nOne epoch of LibriSpeech train-clean-100 ({TRAIN_CLEAN_100_HOURS} h of audio), ds2_reference {where()}:")
    for path in ("ds2exp", "naive", "pytorch"):
        r = by.get(("ds2_reference", path))
        rate = r.get("audio_per_s") if r else None
        h = epoch_hours(rate)
        more = ">" if r and r.get("bound") else ""
        out(f"  {PATH_LABEL[path]:34s} " + (f"{more}{h:.1f} h ({more}{h / 24:.1f} days) at {'<' if more else ''}"
                                            f"{rate:.3f} audio s/s" if h else "n/a (not measured)"))

    scaling = thread_scaling(out)
    results["scaling"] = scaling
    if peak.get("read_gbs", 0.0) < SLOW_MEMORY_GBS:
        results["one_thread"] = one_thread_duels(quick, peak["read_gbs"], out)
    memory = None if quick else bench_memory.run(cores(), where(), out)
    results["memory"] = memory

    # targets
    out(f"\nTargets {where()}:")
    checks = []
    for m in dict.fromkeys(r["model"] for r in rows):
        for path in DS2EXP_PATHS:
            a = by.get((m, path), {})
            name = f"{m}: {'ds2exp' if path == 'ds2exp' else 'ds2exp graph'}"
            checks.append(check(f"{name} audio s/s / naive audio s/s", a.get("vs_naive"), TARGET_SPEEDUP, True,
                                ".1f", lower_bound=a.get("vs_naive_bound", False)))
            checks.append(check(f"{name} s/step / PyTorch s/step, median", a.get("vs_torch"), TARGET_TORCH_RATIO[m],
                                False, ".2f"))
            mine, theirs = a.get("res", {}).get("times"), a.get("torch_times")
            best = min(mine) / min(theirs) if a.get("step") and mine and theirs else None
            checks.append(check(f"{name} s/step / PyTorch s/step, fastest vs fastest", best, TARGET_TORCH_RATIO[m],
                                False, ".2f"))
            if m == "ds2_reference":
                share = a["gflops"] / peak_g if a.get("gflops") and peak_g else None
                checks.append(check(f"{name} GFLOP/s / GEMM peak", share, TARGET_PEAK_SHARE, True, ".2f"))
    checks.append(check(f"{SCALING_MODEL}: ds2exp step speed-up, 2 threads vs 1", scaling.get("speedup"),
                        TARGET_TWO_THREAD_SPEEDUP, True, ".2f"))
    if memory:
        b, t = bench_memory.COMPARED
        checks.append(check(f"{bench_memory.MODEL} {b}x{t}: ds2exp peak RSS / PyTorch peak RSS", memory.get("ratio"),
                            TARGET_RSS_RATIO, False, ".2f"))
        b, t = bench_memory.RECIPE
        checks.append(check(f"{bench_memory.MODEL} {b}x{t}: ds2exp peak RSS, GiB", memory.get("recipe_gib"),
                            bench_memory.MACHINE_GIB, False, ".1f"))
    for c in checks:
        out(c)
    results["checks"] = checks
    out(f"\n(step bench wall time {time.perf_counter() - t_start:.0f} s)")
    return results


def _print_profile(rows, by, peak, out) -> None:
    out(f"\nds2exp step, where the time goes {where()} (median s/step; Trainer.train_step split by timers around "
        "trainer.grad_fn and trainer.optimizer,\nand around the numpy/numba kernels of the fast layers; "
        "'cores' = process CPU time / wall time):")
    for r in rows:
        res = r["res"]
        if r["path"] != "ds2exp" or "error" in res:
            continue
        p = res["profile"]
        tot = res["s"]
        direct = p.get("conv_fwd", 0.0) + p.get("conv1_dw", 0.0)
        for k in ("rnn_fwd", "rnn_bwd", "im2col", "col2im", "time_shifts"):
            p.setdefault(k, 0.0)
            p.setdefault(k + "_cores", 0.0)
        conv2 = p["im2col"] + p["col2im"] + p["time_shifts"]
        host = p["rnn_fwd"] + p["rnn_bwd"] + conv2 + direct
        other = max(0.0, p["fwd_bwd"] - host)

        def pc(v, cores=None):
            shown = cores is not None and cores == cores  # the C++ kernels report no CPU time (NaN)
            return f"{v:.3f} s ({100 * v / tot:.0f}%" + (f", {cores:.1f} cores)" if shown else ")")

        native = res.get("native_rnn")
        rnn = "RNN layers in C++ (input projection + recurrence)" if native else "LSTM recurrence"

        out(f"  {r['model']}: step {tot:.3f} s, {res['cores']:.1f} cores busy on average; loss {res['loss']:.1f}, "
            f"finite={res['finite']}")
        out(f"    value_and_grad {pc(p['fwd_bwd'], p['fwd_bwd_cores'])} = {rnn} fwd "
            f"{pc(p['rnn_fwd'], p['rnn_fwd_cores'])} + bwd {pc(p['rnn_bwd'], p['rnn_bwd_cores'])}")
        out(f"      + direct conv forwards (conv1; conv2 where FastConv2d picks direct_gemm) + conv1 "
            f"weight gradient {pc(direct)} + conv2 backward im2col/shifts/col2im {pc(conv2)}")
        out(f"      + MindSpore ops ({'' if native else 'input projections, '}conv2 backward GEMMs, BN, CTC, ...) "
            f"{pc(other)}")
        out(f"    Trainer's numpy gradient handling {pc(p['numpy_grads'])};  Adam {pc(p['adam'])}")
        arch = model_arch(r["model"])
        _, _, _, t2 = conv_shapes(r["frames"])
        h, d, g = rnn_dims(arch)
        layer_bytes = g * h * 4
        rec = forward_flops(arch, r["batch"], r["frames"])["rnn_recurrent"]
        if p["rnn_fwd"] > 0 and not native:
            out(f"    recurrence: {r['batch']} rows per pass over W_hh ({layer_bytes / 2 ** 20:.1f} MiB per direction "
                f"and layer, L3 32 MiB) = {r['batch'] / 2:.0f} FLOP/byte; forward {rec / p['rnn_fwd'] / 1e9:.1f} "
                f"GFLOP/s, W_hh read at {int(arch['rnn_layers']) * t2 * d * layer_bytes / p['rnn_fwd'] / 1e9:.1f} GB/s"
                f" (DRAM read {peak.get('read_gbs', float('nan')):.1f} GB/s)")


def amdahl(t1: float, t2: float) -> float:
    """Parallel fraction p of Amdahl's model T(n) = T1 ((1 - p) + p / n) from the 1- and 2-thread times."""
    return min(1.0, max(0.0, 2.0 * (1.0 - t2 / t1)))


def projected_speedup(p: float, n: int, capped: float = 0.0, cap: int = 2) -> float:
    """T1 / T(n) under Amdahl with parallel fraction p, of which `capped` (a share of T1) can use at
    most `cap` threads: T(n) = T1 ((1 - p) + (p - capped) / n + capped / min(n, cap))."""
    capped = min(capped, p)
    return 1.0 / ((1.0 - p) + (p - capped) / n + capped / min(n, cap))


def thread_scaling(out: Callable[[str], None]) -> Dict[str, Any]:
    """The ds2exp step on 1 and on 2 threads (hardware.threads, the kernels' threads, taskset),
    alternating step by step, and the projection to 8 and 16 cores."""
    b, t = SHAPES[SCALING_MODEL]
    out(f"\nThread scaling {where()}: {SCALING_MODEL} ds2exp step, batch {b}x{t}, 1 vs 2 threads "
        f"(hardware.threads, OMP_NUM_THREADS, DS2EXP_RNN_THREADS, taskset), {SCALING_STEPS} alternating steps each")
    if cores() < 2:
        out("  n/a: this process may use only one core")
        return {}
    kw = dict(child="ds2exp", model=SCALING_MODEL, batch=b, frames=t, warmup=2)
    one, two = run_duel(dict(kw, threads=1), dict(kw, threads=2), SCALING_STEPS)
    if "error" in one or "error" in two:
        out(f"  failed: {one.get('error') or two.get('error')}")
        return {}
    t1, t2 = one["s"], two["s"]
    p = amdahl(t1, t2)
    prof = one["profile"]
    rec = min(p, (prof.get("rnn_fwd", 0.0) + prof.get("rnn_bwd", 0.0)) / t1)
    if one.get("native_rnn"):  # the C++ recurrence gives each thread 16 hidden units at least
        cap = max(1, rnn_dims(model_arch(SCALING_MODEL))[0] // 16)
        how = "blocks of 16 hidden units"
    else:  # the numba recurrence splits each direction's rows into chunks of at least 4 (kernels.rnn.row_chunks)
        cap = 2 * -(-b // 4)
        how = f"2 directions x row chunks of at least 4 of the {b} rows"
    out(f"  1 thread {t1:.3f} s/step, 2 threads {t2:.3f} s/step: speed-up {t1 / t2:.2f}x; cores busy "
        f"{one['cores']:.1f} and {two['cores']:.1f}")
    out(f"  model: T(n) = T1 ((1 - p) + (p - r) / n + r / min(n, {cap})); p = 2 (1 - T2/T1) = {p:.2f} (Amdahl's "
        f"parallel fraction), r = {rec:.2f} = the recurrence's share of T1, which can use at most {cap} threads "
        f"({how})")
    for n in (8, 16):
        sp = projected_speedup(p, n, rec, cap)
        out(f"  projected {n:2d} cores: {sp:.2f}x ({t1 / sp:.3f} s/step); with no cap on the recurrence: "
            f"{projected_speedup(p, n):.2f}x")
    return {"t1": t1, "t2": t2, "speedup": t1 / t2, "p": p, "recurrence_share": rec}


def one_thread_duels(quick: bool, read_gbs: float, out: Callable[[str], None]) -> Dict[str, Any]:
    """ds2exp against PyTorch with both on one thread, on a host whose memory read bandwidth is low."""
    out(f"\nOne thread each {where()} (memory read {read_gbs:.1f} GB/s, under {SLOW_MEMORY_GBS:.0f}: per core the "
        "memory bandwidth matters less):")
    found = {}
    for m in (["ds2_tiny"] if quick else ["ds2_tiny", "ds2_reference"]):
        b, t = SHAPES[m]
        kw = dict(model=m, batch=b, frames=t, warmup=2 if m == "ds2_tiny" else 1, threads=1)
        mine, theirs = run_duel(dict(kw, child="ds2exp"), dict(kw, child="torch"), 5 if m == "ds2_tiny" else 3)
        if "error" in mine or "error" in theirs:
            out(f"  {m}: failed: {mine.get('error') or theirs.get('error')}")
            continue
        found[m] = mine["s"] / theirs["s"]
        out(f"  {m} {b}x{t}: ds2exp {mine['s']:.3f} s/step, PyTorch {theirs['s']:.3f} s/step: {found[m]:.2f}x")
    return found


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="ds2_tiny only")
    ap.add_argument("--naive-timeout", type=float, default=360.0,
                    help="seconds after which the naive ds2_reference row is killed (its s/step is then a lower bound)")
    args = ap.parse_args(argv)
    run(quick=args.quick, out=lambda s: print(s, flush=True), naive_timeout=args.naive_timeout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
