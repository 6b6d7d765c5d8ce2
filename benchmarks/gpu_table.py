"""GPU summary table for benchmarks/gpu_check.sh: op, shape, dtype, provider, time, GB/s, % of copy; as markdown
and as JSON (one object per row, the run's metadata once).

Timing: triton.testing.do_bench (median; --rep ms of repeats, a quarter of that of warm-up), inputs rotated
across enough copies that L2 cannot hold them. Bytes are analytic (each input read once, each output written
once). The ceiling is a device-to-device copy measured the same way in the same run.

Per row, where they apply (JSON keys; markdown columns time_us, graph_us, kernel_us):
- ``time_us``: the public call as a user makes it (argument checks, dispatch, allocation, launches);
- ``time_us_graph``: the same calls captured in one CUDA graph and replayed (triton's do_bench_cudagraph,
  --graph-rep ms): the device time without Python and launch cost; ``host_us`` = time_us - time_us_graph;
- ``time_us_kernel``: fastlayers' backend kernel alone (outputs and workspace made once, no checks);
- ``gbps``/``pct_copy`` from each of them (``_graph``, ``_kernel`` suffixes), ``tflops`` where compute matters.
Providers: ``fastlayers`` (backend cuda / triton; cpu on the smoke run), ``torch`` (eager, compile),
``liger`` (Liger-Kernel), ``mamba_ssm`` (its Triton kernels), ``causal-conv1d``, ``flash_mla``
(benchmarks/gpu_peers.py). A peer that is missing or cannot run is a row of its own whose ``status`` says
why ("not installed", "unavailable", "needs GPU" on the smoke run); statuses: ok, error, not run (--budget
spent), not installed, unavailable, needs GPU.

    python benchmarks/gpu_table.py [--quick] [--md results.md] [--json results.json]
    python benchmarks/gpu_table.py --cpu-smoke [--json x.json]  # tiny shapes on the CPU: keeps the script from rotting
    python benchmarks/gpu_table.py --render benchmarks/results/2026-12-04-h200.json [--families mla]
    python benchmarks/gpu_table.py --results-name                # the dated file name gpu_check.sh gives the JSON

The smoke run sets TRITON_INTERPRET=1 before any peer is imported, so peers' Triton kernels run on CPU
tensors where the interpreter can run them; the others' rows say "needs GPU" with the interpreter's error
(their import and argument plumbing still ran). It has no CUDA graphs: graph_us is n/a.

The HybridNorm rows (gpu_table_hybridnorm.py) add qkv_norm_rope and swiglu GB/s, the QKV-norm
attention against SDPA alone (target <= 1.15x) and the HybridNormBlock against the compiled reference;
gpu_table_mla.py adds mla_decode (512+64 and Zebra's latent sizes; cuda and triton), selective_state_update,
causal_conv1d and the selective_scan forward and forward + backward (cuda); gpu_table_ssd.py the ssd_scan
(Mamba-2) forward and forward + backward with TFLOP/s.

--budget: no timing starts after that many seconds; each family may run on until what is left is what the
later families are guaranteed (half their share of the budget by WEIGHT), so a tight budget still gives
every family rows. Rows with no time left are reported with status "not run".
"""
import argparse
import datetime
import itertools
import json
import os
import re
import subprocess
import sys
import time

if __name__ == "__main__" and "--cpu-smoke" in sys.argv[1:]:
    # Before triton is imported (by torch or fastlayers): its own library functions (tl.sigmoid, ...) are
    # decorated at import, interpreted only if this is set then; peers' kernels can then run on CPU tensors.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import fastlayers  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gpu_peers as peers  # noqa: E402

DEVICE = "cuda"
DEADLINE = None  # time.monotonic() after which no more timings start (--budget, per family)
REP_MS = 100     # do_bench repeats (ms); warm-up a quarter of it
GRAPH_REP_MS = 10  # do_bench_cudagraph repeats (ms); 0: no graph timing
SCHEMA = 1
PEERS = {"liger", "mamba_ssm", "causal-conv1d", "flash_mla"}
STATUSES = ("ok", "error", "not run", "not installed", "unavailable", "needs GPU")
ROW_KEYS = ("family", "op", "shape", "dtype", "provider", "backend", "status", "time_us", "time_us_graph", "host_us",
            "time_us_kernel", "gbps", "pct_copy", "gbps_graph", "pct_copy_graph", "gbps_kernel", "pct_copy_kernel",
            "tflops", "note")
# Relative run time of the families on an H200 (a guess from the 2026-11-27 run): sizes what --budget keeps
# for the families after the one running.
WEIGHT = dict(mla=3, ssd=1, scan=1, state_update=0.5, conv1d=1, hybridnorm=2, norm=4, overhead=0.5)


class OutOfTime(RuntimeError):
    """Raised by bench() past --budget: the row is reported as not run, the table still prints."""


def bench(fn_of_set, sets, deadline=True):
    """Median time (s) of fn over rotating input sets (on the CPU smoke run: best of 3 calls)."""
    if deadline and DEADLINE is not None and time.monotonic() > DEADLINE:
        raise OutOfTime("--budget spent, not run")
    it = itertools.cycle(sets)
    if DEVICE == "cpu":
        fn_of_set(next(it))
        ts = []
        for _ in range(3):
            t = time.perf_counter()
            fn_of_set(next(it))
            ts.append(time.perf_counter() - t)
        return min(ts)
    from triton.testing import do_bench

    return do_bench(lambda: fn_of_set(next(it)), warmup=max(1, REP_MS // 4), rep=REP_MS, return_mode="median") * 1e-3


def bench_graph(fn_of_set, sets):
    """Median time (s) of fn's calls captured in one CUDA graph and replayed; None where there are no graphs."""
    if DEVICE != "cuda" or not GRAPH_REP_MS:
        return None
    from triton.testing import do_bench_cudagraph

    it = itertools.cycle(sets)
    try:
        ms = do_bench_cudagraph(lambda: fn_of_set(next(it)), rep=GRAPH_REP_MS, return_mode="median")
    except TypeError:  # an older triton without return_mode: its mean
        ms = do_bench_cudagraph(lambda: fn_of_set(next(it)), rep=GRAPH_REP_MS)
    return ms * 1e-3


def _dtype_name(dtype):
    return dtype if isinstance(dtype, str) else str(dtype).replace("torch.", "")


def new_row(label, status="ok", note=""):
    """A row: label = (op, shape, dtype, provider, backend); every key of ROW_KEYS present."""
    op, shape, dtype, provider, backend = label
    row = dict.fromkeys(ROW_KEYS)
    row.update(op=op, shape=shape, dtype=_dtype_name(dtype), provider=provider, backend=backend, status=status,
               note=note)
    return row


def status_row(rows, label, status, note):
    """A row with no timing: a peer that is missing or cannot run, a case skipped on purpose."""
    assert status in STATUSES, status
    rows.append(new_row(label, status, note))
    return rows[-1]


def peer_missing_rows(rows, ops, provider, why):
    """One row per op name in ``ops`` for a peer that cannot be called here (``why`` = (status, reason))."""
    for op in ops:
        status_row(rows, (op, "-", "-", provider, "-"), *why)


def _err(e):
    return f"{type(e).__name__}: {e}".splitlines()[0][:160]


def _fill(row, suffix, t, nbytes, ceiling, flops=None):
    row["time_us" + suffix] = t * 1e6
    if nbytes:
        gbps = nbytes / t / 1e9
        row["gbps" + suffix], row["pct_copy" + suffix] = gbps, 100.0 * gbps / ceiling
    if flops and not suffix:
        row["tflops"] = flops / t / 1e12


def _add_note(row, text):
    row["note"] = f"{row['note']}; {text}" if row["note"] else text


def timed_row(rows, label, fn_of_set, sets, nbytes, ceiling, grad=False, flops=None, kernel=None, graph=True,
              note=""):
    """Time fn over sets (under no_grad, or enable_grad with ``grad``): the public call plainly, then replayed
    from a CUDA graph (``graph``), then ``kernel`` (the backend kernel alone, same sets) where given; append
    the row (label = (op, shape, dtype, provider, backend)). A call that raises is a row with status "error"
    ("needs GPU" for a peer on the smoke run): report, don't hide. Returns the plain time (s) or None."""
    row = new_row(label, note=note)
    rows.append(row)
    with torch.enable_grad() if grad else torch.no_grad():
        try:
            t = bench(fn_of_set, sets)
        except OutOfTime:
            row.update(status="not run", note="--budget spent")
            return None
        except Exception as e:  # noqa: BLE001
            if label[3] in PEERS and DEVICE != "cuda":
                row.update(status="needs GPU", note=f"peer needs a GPU (Triton interpreter: {_err(e)})"[:200])
            else:
                row.update(status="error", note=_err(e))
            return None
        _fill(row, "", t, nbytes, ceiling, flops)
        if graph:
            try:
                tg = bench_graph(fn_of_set, sets)
            except Exception as e:  # noqa: BLE001 - a call that cannot be captured: say so, keep the row
                tg = None
                _add_note(row, f"graph: {_err(e)}"[:120])
            if tg is not None:
                _fill(row, "_graph", tg, nbytes, ceiling)
                row["host_us"] = (t - tg) * 1e6
        if kernel is not None:
            try:
                _fill(row, "_kernel", bench(kernel, sets, deadline=False), nbytes, ceiling)
            except Exception as e:  # noqa: BLE001
                _add_note(row, f"kernel alone: {_err(e)}"[:120])
    return t


def n_sets(nbytes_per_set, l2_bytes):
    return max(2, min(16, int(3 * l2_bytes // max(nbytes_per_set, 1)) + 1))


def copy_gbps(l2):
    n = (256 << 20) if DEVICE == "cuda" else (4 << 20)
    sets = [(torch.empty(n // 4, device=DEVICE), torch.empty(n // 4, device=DEVICE)) for _ in range(2)]
    for a, _ in sets:
        a.normal_()
    t = bench(lambda s: s[1].copy_(s[0]), sets)
    return 2 * n / t / 1e9


def fast_backends():
    """The fastlayers backends timed here: cuda and triton where built (GPU), cpu on the smoke run."""
    av = fastlayers.available_backends()
    return [b for b in (("cuda", "triton") if DEVICE == "cuda" else ("cpu",)) if av[b][0]]


def providers():
    """(provider, backend) pairs of the norm rows; liger is added by norm_rows (a row either way)."""
    return [("fastlayers", b) for b in fast_backends()] + [("torch", "eager"), ("torch", "compile")]


_compiled = {}


def make_fn(provider, backend, op, backward):
    """The call of one norm row: fused residual add + RMSNorm / LayerNorm, y only."""
    is_rms = op == "rms_norm"
    if provider == "fastlayers":
        fl = fastlayers.rms_norm if is_rms else fastlayers.layer_norm

        def f(x, r, w, b):
            with fastlayers.use_backend(backend):
                return fl(x, w, residual=r) if is_rms else fl(x, w, b, residual=r)
    elif provider == "torch":
        def f(x, r, w, b):
            h = x + r
            return F.rms_norm(h, (h.shape[-1],), w, 1e-6) if is_rms else F.layer_norm(h, (h.shape[-1],), w, b, 1e-5)
        if backend == "compile":
            key = (op, backward)
            if key not in _compiled:
                _compiled[key] = torch.compile(f, dynamic=True)
            f = _compiled[key]
    elif provider == "liger":
        lg, _ = peers.liger()
        if is_rms and lg.fused_add_rms_norm is not None:
            def f(x, r, w, b):  # also writes x + r (the residual stream), as fastlayers' prenorm=True would
                return lg.fused_add_rms_norm.apply(x, r, w, 1e-6)[0]
        elif is_rms:
            def f(x, r, w, b):
                return lg.rms_norm.apply(x + r, w, 1e-6, 0.0, "llama", False)
        else:
            def f(x, r, w, b):
                return lg.layer_norm.apply(x + r, w, b, 1e-5)
    else:
        raise ValueError(provider)
    if not backward:
        return lambda s: f(*s[:4])

    def fb(s):
        for t in s[:4]:
            t.grad = None
        f(*s[:4]).backward(s[4])
    return fb


def _norm_kernel(backend, op, tok, hid, dtype):
    """fastlayers' forward kernel alone (outputs made once) for the rows' sets."""
    from fastlayers.backends import load
    be = load(backend)
    y = torch.empty(tok, hid, device=DEVICE, dtype=dtype)
    rstd = torch.empty(tok, device=DEVICE)
    mean = None if op == "rms_norm" else torch.empty(tok, device=DEVICE)

    def kern(s):
        x, r, w, b = s[:4]
        if op == "rms_norm":
            be.norm_fwd(x, r, w, None, y, None, None, rstd, 1e-6, True)
        else:
            be.norm_fwd(x, r, w, b, y, None, mean, rstd, 1e-5, False)
    return kern


def norm_rows(gt, ceiling, l2, quick=False, smoke=False):
    """rms_norm / layer_norm with a residual, forward and forward + backward, every provider and Liger."""
    if smoke:
        shapes = [(64, 256)]
    else:
        shapes = [(8192, 4096)] if quick else [(t, h) for t in (4096, 8192, 16384) for h in (2048, 4096, 8192)]
    rows = []
    lg, why = peers.liger()
    if lg is None:
        peer_missing_rows(rows, ("rms_norm", "layer_norm"), "liger", why)
    provs = providers() + ([("liger", "triton")] if lg is not None else [])
    for op, backward, (tok, hid), dtype in itertools.product(
            ("rms_norm", "layer_norm"), (False, True), shapes, (torch.bfloat16, torch.float32)):
        if dtype == torch.float32 and (tok, hid) != shapes[0]:
            continue
        if backward and hid == 2048:
            continue
        esz = torch.tensor([], dtype=dtype).element_size()
        per = tok * hid * esz
        nbytes = (3 + (4 if backward else 0)) * per
        sets = []
        for _ in range(n_sets(nbytes, l2)):
            x, r = (torch.randn(tok, hid, device=DEVICE, dtype=dtype, requires_grad=backward) for _ in range(2))
            w, b = (torch.randn(hid, device=DEVICE, dtype=dtype, requires_grad=backward) for _ in range(2))
            sets.append((x, r, w, b, torch.randn(tok, hid, device=DEVICE, dtype=dtype)))
        for prov, backend in provs:
            fn = make_fn(prov, backend, op, backward)
            kern = _norm_kernel(backend, op, tok, hid, dtype) if prov == "fastlayers" and not backward else None
            note = "x + r in torch" if prov == "liger" and not (op == "rms_norm" and lg.fused_add_rms_norm) else ""
            label = (op + (" fwd+bwd" if backward else " fwd"), f"{tok}x{hid}", dtype, prov, backend)
            timed_row(rows, label, fn, sets, nbytes, ceiling, grad=backward, kernel=kern, note=note)
        del sets
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
    return rows


def overhead_rows(gt, ceiling, l2, quick=False, smoke=False):
    """What the Python wrapper costs: rms_norm with a residual (fwd, bf16) at a size where the kernel is
    short, through fastlayers.rms_norm, through the backend's launcher alone (buffers made once), and
    F.rms_norm of x + r (eager) for scale."""
    from fastlayers.backends import load
    tok, hid = (64, 256) if smoke else (4096, 2048)
    dtype = torch.float32 if smoke else torch.bfloat16
    x, r, y, h = (torch.randn(tok, hid, device=DEVICE, dtype=dtype) for _ in range(4))
    w = torch.randn(hid, device=DEVICE, dtype=dtype)
    mean, rstd = (torch.empty(tok, device=DEVICE) for _ in range(2))
    nbytes = 4 * tok * hid * x.element_size()
    rows = []
    for prov in fast_backends():
        be = load(prov)

        def api(_s, prov=prov):
            with fastlayers.use_backend(prov):
                fastlayers.rms_norm(x, w, residual=r, prenorm=True)

        def kernel(_s, be=be):
            be.norm_fwd(x, r, w, None, y, h, mean, rstd, 1e-6, True)

        timed_row(rows, ("rms_norm fwd (API)", f"{tok}x{hid}", dtype, "fastlayers", prov), api, [None], nbytes,
                  ceiling, kernel=kernel)
        timed_row(rows, ("rms_norm fwd (kernel alone)", f"{tok}x{hid}", dtype, "fastlayers", prov), kernel, [None],
                  nbytes, ceiling)
    timed_row(rows, ("rms_norm fwd (eager)", f"{tok}x{hid}", dtype, "torch", "eager"),
              lambda _s: F.rms_norm(x + r, (hid,), w, 1e-6), [None], nbytes, ceiling)
    return rows


# ------------------------------------------------------------------------------------------------ output
def _num(v, fmt):
    return "-" if v is None else format(v, fmt)


def md_head(graphs=True):
    head = ("op", "shape", "dtype", "provider", "backend", "time_us", "graph_us", "kernel_us", "GB/s",
            "% of copy / note")
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]


def md_line(r, graphs=True):
    """One markdown line of a row dict (graph_us is n/a on a run without CUDA graphs)."""
    if r["status"] != "ok":
        tail = f"{r['status'].upper()}: {r['note']}" if r["note"] else r["status"].upper()
        cells = [r["op"], r["shape"], r["dtype"], r["provider"], r["backend"], "-", "-", "-", "-", tail]
    else:
        parts = []
        if r["pct_copy"] is not None:
            parts.append(f"{r['pct_copy']:.0f}%")
        if r["tflops"] is not None:
            parts.append(f"{r['tflops']:.1f} TFLOP/s")
        if r["note"]:
            parts.append(r["note"])
        graph = _num(r["time_us_graph"], ".1f") if graphs else "n/a"
        cells = [r["op"], r["shape"], r["dtype"], r["provider"], r["backend"], _num(r["time_us"], ".1f"), graph,
                 _num(r["time_us_kernel"], ".1f"), _num(r["gbps"], ".0f"), "; ".join(parts) or "-"]
    return "| " + " | ".join(str(c) for c in cells) + " |"


def card_slug(name):
    """'NVIDIA H200' -> 'h200'; the CPU -> 'cpu'."""
    s = re.sub(r"^nvidia\s+", "", name.strip().lower())
    s = re.sub(r"[^a-z0-9]+", "-", s).strip("-")
    return s or "unknown"


def results_name(device_name=None, date=None):
    """The file name of a run's JSON under benchmarks/results/: YYYY-MM-DD-<card>.json (UTC date)."""
    if device_name is None:
        device_name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    date = date or datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    return f"{date}-{card_slug(device_name)}.json"


def git_commit():
    """(commit, dirty): git's HEAD of this tree, else $FASTLAYERS_COMMIT (a copy without .git), else 'unknown'."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        if head.returncode == 0:
            st = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                capture_output=True, text=True, timeout=10)
            return head.stdout.strip(), bool(st.stdout.strip())
    except (OSError, subprocess.SubprocessError):
        pass
    return os.environ.get("FASTLAYERS_COMMIT", "unknown"), None


def run_meta(name, ceiling, l2, a, smoke):
    import triton
    commit, dirty = git_commit()
    av = fastlayers.available_backends()
    meta = dict(
        schema=SCHEMA, date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        device=name, smoke=smoke, graphs=bool(DEVICE == "cuda" and GRAPH_REP_MS),
        torch=torch.__version__, triton=triton.__version__, cuda=torch.version.cuda, python=sys.version.split()[0],
        git_commit=commit, git_dirty=dirty, fastlayers_backends={k: bool(v[0]) for k, v in av.items()},
        copy_ceiling_gbps=ceiling, l2_bytes=l2, peers=peers.versions(),
        args=dict(quick=a.quick, families=a.families, budget=a.budget, rep_ms=REP_MS, graph_rep_ms=GRAPH_REP_MS),
        timing=("triton.testing.do_bench median, inputs rotated past the L2; graph: do_bench_cudagraph median; "
                "bytes analytic (inputs read once, outputs written once)" if DEVICE == "cuda" else
                "CPU smoke run: best of 3 calls, tiny shapes, timings meaningless"))
    if DEVICE == "cuda":
        p = torch.cuda.get_device_properties(0)
        meta.update(sm_count=p.multi_processor_count, memory_bytes=p.total_memory,
                    capability=".".join(map(str, torch.cuda.get_device_capability())))
    return meta


def _finite(v):
    """NaN / inf -> None (JSON has neither)."""
    if isinstance(v, float) and v != v or v in (float("inf"), float("-inf")):
        return None
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_finite(x) for x in v]
    return v


def _write_json(path, doc):
    doc = _finite(doc)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1, allow_nan=False, default=str)
        f.write("\n")
    os.replace(tmp, path)


def render(path, families=None):
    """Markdown of a saved run (benchmarks/results/*.json): the metadata line, then the rows."""
    with open(path) as f:
        doc = json.load(f)
    m = doc["meta"]
    want = set(families.split(",")) if families else None
    lines = [f"device: {m['device']}; device-to-device copy ceiling {m['copy_ceiling_gbps']:.0f} GB/s; torch "
             f"{m['torch']}, triton {m['triton']}; commit {m['git_commit']}; {m['date']}", *md_head()]
    lines += [md_line(r, m.get("graphs", True)) for r in doc["rows"] if want is None or r["family"] in want]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true", help="one shape per op")
    p.add_argument("--md", help="also write the table as markdown to this file")
    p.add_argument("--json", help="also write the rows and the run's metadata as JSON to this file")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on the CPU (CI: the script still runs)")
    p.add_argument("--budget", type=float, help="seconds: rows not started by then are reported as not run")
    p.add_argument("--families", help="comma-separated subset of: " + ",".join(WEIGHT))
    p.add_argument("--rep", type=int, default=100, help="do_bench repeats in ms (default %(default)s)")
    p.add_argument("--graph-rep", type=int, default=10,
                   help="do_bench_cudagraph repeats in ms; 0: no CUDA-graph column (default %(default)s)")
    p.add_argument("--render", metavar="JSON", help="print the markdown table of a saved run and exit")
    p.add_argument("--results-name", action="store_true", help="print the dated JSON file name for this machine")
    a = p.parse_args(argv)
    global DEVICE, DEADLINE, REP_MS, GRAPH_REP_MS
    if a.render:
        print(render(a.render, a.families))
        return
    if a.results_name:
        print(results_name(None if torch.cuda.is_available() and not a.cpu_smoke else "cpu"))
        return
    REP_MS, GRAPH_REP_MS = a.rep, a.graph_rep
    t_start = time.monotonic()
    if a.cpu_smoke:
        DEVICE = "cpu"
        if os.environ.get("TRITON_INTERPRET") != "1":  # main(argv) called in-process: peers' rows say "needs GPU"
            print("TRITON_INTERPRET is not 1 at triton's import: peers' Triton kernels cannot run here", flush=True)
        peers.smoke_shims()
        l2, name = 1 << 20, "cpu (smoke run: tiny shapes, timings meaningless)"
    else:
        if not torch.cuda.is_available():
            sys.exit("gpu_table.py needs a CUDA GPU (or --cpu-smoke)")
        props = torch.cuda.get_device_properties(0)
        l2 = getattr(props, "L2_cache_size", 50 << 20)
        name = torch.cuda.get_device_name()
    ceiling = copy_gbps(l2)
    from gpu_table_hybridnorm import hybridnorm_rows
    from gpu_table_mla import conv1d_rows, mla_rows, scan_rows, state_update_rows
    from gpu_table_ssd import ssd_rows
    graphs = DEVICE == "cuda" and GRAPH_REP_MS > 0
    lines = [f"device: {name}; device-to-device copy ceiling {ceiling:.0f} GB/s; torch {torch.__version__}; "
             f"graph_us: {'CUDA-graph replay' if graphs else 'n/a (no CUDA graphs)'}", *md_head()]
    print("\n".join(lines), flush=True)
    # The open issues' rows first (MLA, the scans), the norms last: with --budget the table ends early
    # and still prints. Each family's rows print (and the markdown and JSON are rewritten) as it finishes.
    families = (mla_rows, ssd_rows, scan_rows, state_update_rows, conv1d_rows, hybridnorm_rows, norm_rows,
                overhead_rows)
    if a.families:
        want = set(a.families.split(","))
        unknown = want - {f.__name__[:-5] for f in families}
        if unknown:
            sys.exit(f"--families: unknown {sorted(unknown)}")
        families = [f for f in families if f.__name__[:-5] in want]
    names = [f.__name__[:-5] for f in families]
    doc = dict(meta=run_meta(name, ceiling, l2, a, a.cpu_smoke), families=[], rows=[], complete=False)
    end = time.monotonic() + a.budget if a.budget else None
    total_w = sum(WEIGHT[n] for n in names)
    for i, (fname, family) in enumerate(zip(names, families)):
        if end is not None:
            later = sum(WEIGHT[n] for n in names[i + 1:])
            keep = 0.5 * a.budget * later / total_w        # guaranteed to the later families
            own = 0.5 * a.budget * WEIGHT[fname] / total_w  # guaranteed to this one
            now = time.monotonic()
            DEADLINE = min(end, max(end - keep, now + own))
        t0 = time.monotonic()
        rows = family(sys.modules[__name__], ceiling, l2, quick=a.quick, smoke=a.cpu_smoke)
        for r in rows:
            r["family"] = fname
            lines.append(md_line(r, graphs))
            print(lines[-1], flush=True)
        doc["rows"] += rows
        doc["families"].append(dict(name=fname, seconds=round(time.monotonic() - t0, 2), rows=len(rows)))
        doc["elapsed_s"] = round(time.monotonic() - t_start, 2)
        if a.md:
            with open(a.md, "w") as f:
                f.write("\n".join(lines) + "\n")
        if a.json:
            _write_json(a.json, doc)
    doc["complete"] = True
    if a.json:
        _write_json(a.json, doc)
    counts = {s: sum(r["status"] == s for r in doc["rows"]) for s in STATUSES}
    print("\n" + "\n".join(lines))
    print(f"\nrows: {len(doc['rows'])} ({', '.join(f'{k} {v}' for k, v in counts.items() if v)}); "
          f"{time.monotonic() - t_start:.0f} s" + (f"; JSON: {a.json}" if a.json else ""))


if __name__ == "__main__":
    main()
