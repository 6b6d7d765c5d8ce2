#!/usr/bin/env python
"""Static GPU kernel report: what the compiler made of every kernel the GPU table times, without a GPU.

    python benchmarks/kernel_report.py [--json kernel_report.json] [--no-cache] [--jobs N] [--hot-only]

For every GPU kernel and every launch configuration the GPU table (benchmarks/gpu_table*.py) would use,
compiled for sm_90 and sm_80: registers per thread, spill stores/loads, stack (local memory), static and
dynamic shared memory, threads per CTA, the theoretical CTAs and warps per SM of an H100/H200, and what the
SASS (and PTX) contains: 128-bit global loads/stores, tensor-core instructions, local loads/stores.

Where the launch configurations come from (nothing is restated by hand):
- Triton: the GPU table's own row functions run once on meta tensors that report themselves as CUDA
  tensors (``MetaAsCuda``, no memory, no GPU), through the public ops, autograd and the wrappers of
  fastlayers/backends/triton*.py. Every ``kernel[grid](...)`` is recorded instead of launched, and
  specialised exactly as the Triton JIT would (its own binder: dtypes, divisibility-by-16 hints,
  constexprs, num_warps, num_stages), then compiled ahead of time with ``triton.compile``.
- CUDA: every template instance of csrc/cuda/*.cu (csrc/sources.txt) from one nvcc compile per file with
  the flags of setup.py (``-Xptxas -v`` adds the resource usage). The same GPU-table run records the calls
  of fastlayers/backends/cuda.py into ``_cuda``; a small C++ probe (the kernel headers on top of the CPU
  emulation, csrc/cuda/emu/cuda_emu.h) replays them through the launch code (``run_norm_fwd`` ...) and
  prints the instance, grid, block and dynamic shared memory each call would launch.

Hot kernels (``HOT``: every kernel a GPU-table row times) must have zero spills and zero local memory in
every configuration a row launches; an exception needs a one-line reason in ``EXCEPTIONS``. The script
exits 1 when a hot kernel spills or uses local memory without an exception, when an exception no longer
matches a spilling kernel, or when ``HOT`` and the kernels the table times disagree; it prints which.

Occupancy (per SM, H100/H200 = sm_90, CUDA C Programming Guide, compute capability 9.0): 65,536 registers,
2,048 threads (64 warps), 32 CTAs, 228 KB shared memory, 227 KB at most per CTA, registers allocated per
warp in units of 256, 1 KB of shared memory reserved per CTA. CTAs/SM = min(by registers, by threads, 32,
by shared memory). The sm_80 rows use the same H100/H200 limits (they describe the sm_80 build, not an A100).

Artefacts are cached under $FASTLAYERS_CACHE_DIR/kernel_report (default ~/.cache/fastlayers/kernel_report),
keyed by a hash of the sources, the configuration and the tool versions. Without nvcc (or g++) the CUDA half
is skipped with a printed reason; the Triton half needs only triton.
"""
import argparse
import concurrent.futures
import contextlib
import fnmatch
import hashlib
import importlib
import importlib.metadata
import importlib.util
import io
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"
ARCHS = (90, 80)
SMS = 132  # H100 SXM / H200: the sm count the wrappers size their grids with (backends.sm_count)

# ----------------------------------------------------------------------------- per-SM limits (sm_90)
SM_REGS = 65536
SM_THREADS = 2048
SM_CTAS = 32
SM_SMEM = 228 * 1024
CTA_SMEM_MAX = 227 * 1024
REG_UNIT = 256           # registers are allocated per warp in units of 256
SMEM_RESERVED = 1024     # shared memory the system reserves per CTA
MAX_REGS = 255

# ----------------------------------------------------------------------------- hot kernels
# Every kernel that a GPU-table row times (the rows of benchmarks/gpu_table*.py with a fastlayers provider),
# with the rows. The run checks this list against the kernels it sees the rows launch.
HOT = {
    # Triton (fastlayers/backends/triton*.py)
    "_norm_fwd_kernel": "rms_norm / layer_norm fwd, fwd+bwd, (API), (kernel alone); HybridNormBlock (triton)",
    "_norm_bwd_kernel": "rms_norm / layer_norm fwd+bwd; HybridNormBlock (triton)",
    "_head_norm_rope_fwd_kernel": "qkv_norm_rope fwd, fwd+bwd; QKV-norm attention; HybridNormBlock",
    "_head_norm_rope_bwd_kernel": "qkv_norm_rope fwd+bwd; QKV-norm attention; HybridNormBlock",
    "_swiglu_fwd_kernel": "swiglu fwd, fwd+bwd; HybridNormBlock",
    "_swiglu_bwd_kernel": "swiglu fwd+bwd; HybridNormBlock",
    "_state_update_kernel": "selective_state_update",
    "_conv_fwd_kernel": "causal_conv1d fwd, fwd+bwd",
    "_conv_bwd_kernel": "causal_conv1d fwd+bwd",
    "_conv_update_kernel": "causal_conv1d_update",
    "_ssd_fwd_kernel": "ssd_scan fwd, fwd+bwd (the backward's recompute with STORE_STATES)",
    "_ssd_bwd_dstates_kernel": "ssd_scan fwd+bwd",
    "_ssd_bwd_chunk_kernel": "ssd_scan fwd+bwd",
    "_mla_split_kernel": "mla_decode, mla_decode kernel (splits) (triton)",
    "_mla_merge_kernel": "mla_decode, mla_decode kernel (triton)",
    # CUDA (csrc/cuda/*.cu), by template name
    "norm_fwd_reg": "rms_norm / layer_norm fwd, fwd+bwd, (API), (kernel alone) (cuda)",
    "norm_bwd_reg": "rms_norm / layer_norm fwd+bwd (cuda)",
    "mla_partial_mma": "mla_decode, mla_decode kernel (cuda; 16-bit inputs)",
    "mla_merge": "mla_decode, mla_decode kernel (cuda)",
    "scan_fwd": "selective_scan fwd, fwd+bwd (cuda)",
    "scan_bwd": "selective_scan fwd+bwd (cuda)",
}

# Hot kernels allowed to spill / use local memory today: (pattern, arch "sm_90" / "sm_80" / "*", reason).
# The pattern (fnmatch) is on the Triton kernel name (they start with "_") or the CUDA instance
# ("scan_bwd<1>"). An exception that no longer matches a spilling hot kernel fails the run: remove it then.
EXCEPTIONS = [
    ("_ssd_bwd_chunk_kernel", "*", "issue 21: ssd_scan backward chunk kernel (~9 KB stack, ~15 KB spills) to be "
                                   "split into GEMM-shaped kernels (DESIGN.md section 8)"),
    ("_ssd_fwd_kernel", "*", "ssd_scan forward (and the backward's recompute): the 32 x 128 fp32 state and the "
                             "chunk tiles exceed the registers at 8 warps; issue 21 (point 2: no spills, no stack)"),
    ("scan_bwd<1>", "*", "CUDA selective_scan backward, N <= 32: __launch_bounds__(128, 4) caps it at 128 registers, "
                         "a 4-8 B spill; issue 21 (point 1: the block-parallel rebuild)"),
]


# ============================================================================= occupancy
def occupancy(threads, regs, smem):
    """Theoretical residency of a kernel on one H100/H200 SM: (ctas, warps, limiter); limiter names every
    resource that allows no more CTAs ("regs+threads" when two tie).

    threads: per CTA; regs: per thread; smem: static + dynamic shared bytes per CTA (without the 1 KB the
    system reserves, added here). ctas is 0 when one CTA does not fit (over 227 KB of shared memory, over
    255 registers or over 1,024 threads)."""
    if threads <= 0 or threads > 1024 or regs > MAX_REGS or smem > CTA_SMEM_MAX:
        return 0, 0, "does not fit"
    warps = -(-threads // 32)
    limits = {"threads": SM_THREADS // (warps * 32), "ctas": SM_CTAS}
    if regs > 0:
        per_warp = -(-regs * 32 // REG_UNIT) * REG_UNIT
        limits["regs"] = SM_REGS // (per_warp * warps)
    limits["smem"] = SM_SMEM // (smem + SMEM_RESERVED)
    ctas = min(limits.values())
    limiter = "+".join(k for k in ("regs", "smem", "threads", "ctas") if limits.get(k) == ctas)
    return ctas, ctas * warps, limiter


# ============================================================================= instruction facts
_SASS_FACTS = {
    "ldg128": re.compile(r"\bLDG\.E\b[.\w]*\.128\b"),
    "stg128": re.compile(r"\bSTG\.E\b[.\w]*\.128\b"),
    "ldgsts128": re.compile(r"\bLDGSTS\b[.\w]*\.128\b"),  # cp.async of 16 bytes (global -> shared)
    "hgmma": re.compile(r"\bHGMMA\b"),
    "hmma": re.compile(r"\bHMMA\b"),
    "ldl": re.compile(r"\bLDL\b"),
    "stl": re.compile(r"\bSTL\b"),
}
_PTX_FACTS = {
    # 128-bit: four 32-bit or two 64-bit elements
    "ld_global_v4": re.compile(r"\bld\.global(?:\.\w+)*\.(?:v4\.[bfus]32|v2\.[bfus]64)\b"),
    "st_global_v4": re.compile(r"\bst\.global(?:\.\w+)*\.(?:v4\.[bfus]32|v2\.[bfus]64)\b"),
    "wgmma": re.compile(r"\bwgmma\.mma_async\b"),
    "mma_sync": re.compile(r"\bmma\.sync\b"),
    "ld_local": re.compile(r"\bld\.local\b"),
    "st_local": re.compile(r"\bst\.local\b"),
}


def sass_facts(sass):
    """Counts of the instructions that matter in one function's SASS."""
    return {k: len(r.findall(sass)) for k, r in _SASS_FACTS.items()}


def ptx_facts(ptx):
    return {k: len(r.findall(ptx)) for k, r in _PTX_FACTS.items()}


def split_sass(text):
    """cuobjdump -sass output -> {(arch, function): sass}."""
    out, arch, fn, buf = {}, None, None, []

    def flush():
        if fn is not None:
            out[(fn_arch, fn)] = "\n".join(buf)
    fn_arch = None
    for line in text.splitlines():
        m = re.match(r"\s*arch = (sm_\d+a?)", line)
        if m:
            flush()
            arch, fn, buf = m.group(1).rstrip("a"), None, []
            continue
        m = re.match(r"\s*Function : (\S+)", line)
        if m:
            flush()
            fn, fn_arch, buf = m.group(1), arch, []
            continue
        if fn is not None:
            buf.append(line)
    flush()
    return out


def parse_ptxas(log):
    """ptxas -v output -> {(arch, function): {regs, spill_st, spill_ld, stack, smem, barriers}}."""
    out, cur = {}, None
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '([^']+)' for '(sm_\d+a?)'", line)
        if m:
            cur = (m.group(2).rstrip("a"), m.group(1))
            out[cur] = dict(regs=0, spill_st=0, spill_ld=0, stack=0, smem=0, barriers=0)
            continue
        if cur is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            out[cur].update(stack=int(m.group(1)), spill_st=int(m.group(2)), spill_ld=int(m.group(3)))
            continue
        m = re.search(r"Used (\d+) registers", line)
        if m:
            out[cur]["regs"] = int(m.group(1))
            b = re.search(r"used (\d+) barriers", line)
            s = re.search(r"(\d+) bytes smem", line)
            out[cur].update(barriers=int(b.group(1)) if b else 0, smem=int(s.group(1)) if s else 0)
            cur = None
    return out


def parse_max_threads(elf_text):
    """cuobjdump -elf output -> {function: max threads per CTA (launch bounds)} for one arch."""
    out, fn = {}, None
    lines = elf_text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith(".nv.info."):
            fn = line[len(".nv.info."):].strip()
        elif line.startswith("."):
            fn = None
        elif fn and "EIATTR_MAX_THREADS" in line:
            for nxt in lines[i + 1:i + 4]:
                m = re.search(r"Value:\s+(0x[0-9a-f]+)\s+(0x[0-9a-f]+)\s+(0x[0-9a-f]+)", nxt)
                if m:
                    x, y, z = (int(v, 16) for v in m.groups())
                    out[fn] = x * y * z
                    break
    return out


# ============================================================================= tools
def tool(name):
    """Path of a CUDA tool: the CUDA toolkit's, else the copy triton ships (cuobjdump, nvdisasm, ptxas)."""
    cands = [os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", name), shutil.which(name)]
    spec = importlib.util.find_spec("triton")
    if spec and spec.origin:
        cands.append(os.path.join(os.path.dirname(spec.origin), "backends", "nvidia", "bin", name))
    for c in cands:
        if c and os.path.exists(c):
            return c
    return None


def find_nvcc():
    for c in (os.environ.get("NVCC"), shutil.which("nvcc"),
              os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")):
        if c and os.path.exists(c):
            return c
    return None


def _version(cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def _pkg_version(name):
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def demangle(names):
    """{mangled: demangled} through c++filt (or cu++filt); the mangled name where neither exists."""
    names = sorted(set(names))
    exe = shutil.which("c++filt") or tool("cu++filt")
    if exe and names:
        res = subprocess.run([exe], input="\n".join(names), capture_output=True, text=True)
        if res.returncode == 0 and len(res.stdout.splitlines()) == len(names):
            return dict(zip(names, res.stdout.splitlines()))
    return {n: n for n in names}


def short_name(demangled):
    """'void fastlayers::cuda_kernels::scan_bwd<8>(fastlayers::SelectiveScanArgs, float*, int)' -> 'scan_bwd<8>'."""
    head = demangled.split("(")[0]
    head = re.sub(r"^\S+\s+", "", head) if " " in head.split("<")[0] else head
    base = head.split("<")[0].split("::")[-1]
    tmpl = head[len(head.split("<")[0]):]
    return base + tmpl.replace(" ", "")


# ============================================================================= cache
class Cache:
    def __init__(self, root, enabled=True):
        self.root, self.enabled = Path(root), enabled
        self.hits = self.misses = 0

    def path(self, kind, key):
        return self.root / kind / f"{key}.pkl"

    def get(self, kind, key):
        p = self.path(kind, key)
        if self.enabled and p.exists():
            try:
                with open(p, "rb") as f:
                    v = pickle.load(f)
                self.hits += 1
                return v
            except Exception:  # a corrupt entry is a miss
                pass
        self.misses += 1
        return None

    def put(self, kind, key, value):
        p = self.path(kind, key)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_suffix(f".{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            pickle.dump(value, f)
        os.replace(tmp, p)


def sha(*parts):
    h = hashlib.sha256()
    for p in parts:
        h.update(repr(p).encode() if not isinstance(p, bytes) else p)
        h.update(b"\0")
    return h.hexdigest()[:32]


def tree_hash(paths):
    h = hashlib.sha256()
    for p in sorted(paths):
        h.update(str(p).encode())
        h.update(Path(p).read_bytes())
    return h.hexdigest()[:32]


def default_cache_dir():
    base = os.environ.get("FASTLAYERS_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "fastlayers")
    return os.path.join(base, "kernel_report")


# ============================================================================= capture: the GPU table on meta tensors
def _meta_as_cuda_mode():
    """A TorchFunctionMode under which meta tensors pass for CUDA tensors (built on first use: imports torch)."""
    import torch
    from torch.autograd import Variable
    from torch.overrides import TorchFunctionMode

    cuda0, meta = torch.device("cuda", 0), torch.device("meta")

    def dev(d):
        if isinstance(d, (str, torch.device)):
            d = torch.device(d)
            return meta if d.type == "cuda" else d
        return meta if isinstance(d, int) and not isinstance(d, bool) else d

    class MetaAsCuda(TorchFunctionMode):
        """Factories asked for CUDA make meta tensors; a meta tensor reports device cuda:0, is_cuda, and a
        distinct 16-byte-aligned fake address per storage (``data_ptr``: alignment specialisation sees the
        true offsets); a tensor made by ``full``/``ones``/``zeros`` keeps its value so that the host can read it
        back (``.cpu()``; mla_decode checks cache_seqlens on the host); backward runs with the mode active."""

        def __init__(self):
            super().__init__()
            self.bases = {}

        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = dict(kwargs or {})
            name = getattr(func, "__name__", "")
            t = args[0] if args and isinstance(args[0], torch.Tensor) else None
            if name == "__get__" and t is not None and t.is_meta:
                owner = getattr(getattr(func, "__self__", None), "__name__", "")
                if owner == "device":
                    return cuda0
                if owner == "is_cuda":
                    return True
            if t is not None and t.is_meta:
                if name == "data_ptr":
                    key = t.untyped_storage()._cdata
                    base = self.bases.setdefault(key, (1 << 40) + len(self.bases) * (1 << 36))
                    return base + t.storage_offset() * t.element_size()
                if name == "get_device":
                    return 0
                if name == "cpu" or (name == "to" and any(isinstance(a, (str, torch.device)) and
                                                          torch.device(a).type == "cpu" for a in args[1:])):
                    fill = getattr(t, "_kernel_report_fill", None)
                    if fill is None:
                        raise RuntimeError("kernel_report: a GPU-table row reads a GPU tensor on the host; only "
                                           "tensors made by torch.full/ones/zeros keep their values here")
                    with torch._C.DisableTorchFunction():
                        return torch.full(tuple(t.shape), fill, dtype=t.dtype)
                if name == "cuda":
                    return t
            if name == "backward" or (name == "grad" and getattr(func, "__module__", "").startswith("torch.autograd")):
                return self._backward(func, name, args, kwargs)
            if "device" in kwargs:
                kwargs["device"] = dev(kwargs["device"])
            if name == "to" and t is not None:
                args = (t,) + tuple(dev(a) if isinstance(a, (str, torch.device)) else a for a in args[1:])
            out = func(*args, **kwargs)
            if name in ("full", "ones", "zeros") and isinstance(out, torch.Tensor) and out.is_meta:
                out._kernel_report_fill = {"full": args[1] if len(args) > 1 else kwargs.get("fill_value"),
                                           "ones": 1, "zeros": 0}[name]
            return out

        def _backward(self, func, name, args, kwargs):
            # The engine runs meta work on this thread; with the mode pushed again the backward's allocations
            # and launches see CUDA tensors too.
            def tup(x):
                return tuple(x) if isinstance(x, (list, tuple)) else (x,)
            if name == "grad":
                outs, inputs = tup(args[0] if args else kwargs["outputs"]), tup(args[1] if len(args) > 1
                                                                                  else kwargs["inputs"])
                grads = tup(args[2] if len(args) > 2 else kwargs.get("grad_outputs"))
                with self:
                    return Variable._execution_engine.run_backward(outs, grads, False, False, inputs, True, False)
            if func is torch.Tensor.backward:
                outs, grads = (args[0],), (args[1] if len(args) > 1 else kwargs.get("gradient"),)
            else:
                outs, grads = tup(args[0] if args else kwargs["tensors"]), tup(
                    args[1] if len(args) > 1 else kwargs.get("grad_tensors"))
            grads = tuple(torch.ones_like(o) if g is None else g for o, g in zip(outs, grads))
            with self:
                Variable._execution_engine.run_backward(outs, grads, False, False, (), True, True)
            return None

    return MetaAsCuda()


class _NoDevice:
    """torch.cuda.device stand-in: nothing to select."""

    def __init__(self, *a, **k):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


class _Stream:
    cuda_stream = 0


_CUDA_ENTRIES = ("norm_fwd", "norm_bwd", "mla_decode", "selective_scan_fwd", "selective_scan_bwd")


class _CudaRecorder:
    """Stands in for fastlayers._cuda: records the kernel entry points' arguments by name, answers the host
    helpers (norm_bwd_parts, selective_scan_bwd_ckpt) with the real module's."""

    def __init__(self, real, calls, label, active):
        self._real, self._calls, self._label, self._active = real, calls, label, active
        self._names = {}
        for e in _CUDA_ENTRIES:
            doc = (getattr(real, e).__doc__ or "").splitlines()[0]
            self._names[e] = re.findall(r"(?:\(|, )(\w+):", doc)

    def __getattr__(self, name):
        if name in _CUDA_ENTRIES:
            def rec(*args, _e=name, **kw):
                names = self._names[_e]
                if len(args) > len(names):
                    raise RuntimeError(f"kernel_report: _cuda.{_e} got {len(args)} arguments, its signature names "
                                       f"{len(names)}")
                if self._active[0]:
                    self._calls.append((self._label[0], _e, {**dict(zip(names, args)), **kw}))
            return rec
        if name == "sm_count":
            return lambda device: SMS
        if name == "device_count":
            return lambda: 1
        return getattr(self._real, name)


def capture(quiet=False, sweep=False, families=None):
    """Run the GPU table's rows on meta tensors; returns (triton launches, cuda calls, notes).

    sweep: also the MLA tuning sweep (gpu_table_mla._triton_sweep: launch configurations set by hand through
    triton_mla.CONFIG, not chosen by the wrapper; reported, never under the hot-kernel rule).
    families: names of the GPU table's row functions to run (default: all, as gpu_table.main does).

    triton launches: [(row label, JITFunction, args, kwargs, grid)]; cuda calls: [(row label, entry, {arg: value})]."""
    os.environ["TRITON_INTERPRET"] = "0"  # before triton's first import: kernels are JITFunctions, not interpreted
    import torch
    from triton.runtime.jit import JITFunction

    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    import fastlayers
    from fastlayers import backend as fl_backend
    from fastlayers import backends as fl_backends
    from fastlayers.backends import cuda as cuda_be
    from fastlayers.backends import triton as triton_be

    if triton_be.IMPORT_ERROR is not None:
        raise RuntimeError(f"kernel_report: triton is not usable: {triton_be.IMPORT_ERROR}")
    if triton_be._interpreted():
        raise RuntimeError("kernel_report: triton was imported under TRITON_INTERPRET=1 in this process: its kernels "
                           "are interpreted, nothing would be recorded; run the report in a fresh interpreter")

    notes = []
    launches, calls = [], []
    label, active = [None], [False]  # the row being timed; inside its timed call (setup work is not recorded)
    patches = []

    def patch(obj, attr, value):
        patches.append((obj, attr, getattr(obj, attr)))
        setattr(obj, attr, value)

    def run(self, *args, grid, warmup, **kwargs):
        if active[0]:
            launches.append((label[0], self, args, kwargs, grid))

    fake_cuda = cuda_be._cuda is not None
    if not fake_cuda:
        notes.append(f"CUDA launches not captured: fastlayers._cuda did not import ({cuda_be.IMPORT_ERROR})")
    import gpu_table as gt
    import gpu_table_hybridnorm as gh
    import gpu_table_mla as gm
    import gpu_table_ssd as gs

    fast = ("triton", "cuda", "fastlayers")

    def bench(fn, sets, deadline=True):
        if label[0][3] in fast:
            active[0] = True
            try:
                fn(next(iter(sets)))
            finally:
                active[0] = False
        return 1e-3

    def timed_row(rows, lab, *a, _orig=gt.timed_row, **k):
        label[0] = lab
        return _orig(rows, lab, *a, **k)

    errors = []
    try:
        patch(JITFunction, "run", run)
        patch(torch.cuda, "device", _NoDevice)
        patch(torch.cuda, "current_stream", lambda *a, **k: _Stream())
        patch(torch, "compile", lambda fn=None, *a, **k: fn if fn is not None else (lambda f: f))
        patch(gt, "DEVICE", "cuda")
        patch(gt, "bench", bench)
        patch(gt, "timed_row", timed_row)
        patch(gt, "bench_graph", lambda *a, **k: None)  # no CUDA-graph replay: the same launches again
        if not sweep:
            patch(gm, "_triton_sweep", lambda *a, **k: None)
        saved_sm = dict(fl_backends._SM_COUNT)
        fl_backends._SM_COUNT[0] = SMS
        saved_status = dict(fl_backend._cache)
        if fake_cuda:
            patch(cuda_be, "_cuda", _CudaRecorder(cuda_be._cuda, calls, label, active))
            fl_backend._cache["cuda"] = (True, "kernel_report: calls recorded")
        fl_backend._cache["triton"] = (True, "kernel_report: launches recorded")
        fams = (gm.mla_rows, gs.ssd_rows, gm.scan_rows, gm.state_update_rows, gm.conv1d_rows,
                gh.hybridnorm_rows, gt.norm_rows, gt.overhead_rows)
        with _meta_as_cuda_mode():
            for fam in fams:
                if families is not None and fam.__name__ not in families:
                    continue
                for r in fam(gt, 1000.0, 50 << 20):
                    if r["status"] == "error" and r["provider"] in fast:
                        errors.append(f"{r['op']} {r['shape']} {r['dtype']} {r['provider']} {r['backend']}: "
                                      f"{r['note']}")
    finally:
        for obj, attr, old in reversed(patches):
            setattr(obj, attr, old)
        fl_backends._SM_COUNT.clear()
        fl_backends._SM_COUNT.update(saved_sm)
        fl_backend._cache.clear()
        fl_backend._cache.update(saved_status)
    if errors:
        raise RuntimeError("kernel_report: GPU-table rows failed on meta tensors:\n  " + "\n  ".join(errors))
    if not quiet:
        print(f"captured {len(launches)} Triton launches and {len(calls)} CUDA calls from the GPU table "
              f"(fastlayers from {os.path.dirname(fastlayers.__file__)})", flush=True)
    return launches, calls, notes


# ============================================================================= Triton jobs
def triton_jobs(launches, archs=ARCHS):
    """Specialise each recorded launch as the JIT would for each arch; dedupe into compile jobs.

    Returns {job key: job}; a job has module, name, path, arch, signature, constexprs, attrs, options, labels,
    grids."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime import jit as tjit

    jobs = {}
    binders = {}
    for lab, fn, args, kwargs, grid in launches:
        kwargs = dict(kwargs)
        # What JITFunction.run adds before binding.
        kwargs["debug"] = kwargs.get("debug", fn.debug) or tjit.knobs.runtime.debug
        kwargs["instrumentation_mode"] = tjit.knobs.compilation.instrumentation_mode
        kwargs["fpsan_homomorphic_casts"] = tjit.knobs.compilation.fpsan_homomorphic_casts
        for arch in archs:
            bk = (id(fn), arch)
            if bk not in binders:
                backend = make_backend(GPUTarget("cuda", arch, 32))
                binders[bk] = (backend, tjit.create_function_from_signature(fn.signature, fn.params, backend))
            backend, binder = binders[bk]
            bound, spec, opts = binder(*args, **kwargs)
            options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, spec, opts)
            if callable(grid):
                grid = grid(bound)
            job = dict(module=fn.__module__, name=fn.__name__, path=os.path.abspath(fn.fn.__code__.co_filename),
                       arch=arch, signature=dict(signature), constexprs=dict(constexprs), attrs=dict(attrs),
                       options=dict(options.__dict__), fn_hash=fn.cache_key)
            key = sha("triton", job["module"], job["name"], job["fn_hash"], arch, sorted(job["signature"].items()),
                      sorted(job["constexprs"].items(), key=repr), sorted(job["attrs"].items(), key=repr),
                      sorted(job["options"].items(), key=repr), triton.__version__)
            cfg = sha(job["module"], job["name"], sorted(job["signature"].items()),
                      sorted(job["constexprs"].items(), key=repr), sorted(job["attrs"].items(), key=repr),
                      [job["options"].get(o) for o in ("num_warps", "num_stages", "maxnreg", "num_ctas")])[:4]
            job = jobs.setdefault(key, {**job, "key": key, "cfg": cfg, "labels": [], "grids": []})
            if lab is not None and " ".join(map(str, lab[:4])) not in job["labels"]:
                job["labels"].append(" ".join(map(str, lab[:4])))
            g = tuple(int(x) for x in grid) + (1,) * (3 - len(grid))
            if g not in job["grids"]:
                job["grids"].append(g)
    return jobs


def compile_triton_job(job):
    """Compile one Triton job (in a worker process) and measure it: ptxas log, metadata, PTX and SASS facts."""
    os.environ["TRITON_INTERPRET"] = "0"
    os.environ["TRITON_ALWAYS_COMPILE"] = "1"  # ptxas runs (and logs) every time: the cache here is ours
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    try:
        mod = importlib.import_module(job["module"])
        if os.path.abspath(getattr(mod, "__file__", "")) != job["path"]:
            raise ImportError
    except ImportError:
        spec = importlib.util.spec_from_file_location(job["module"], job["path"])
        mod = importlib.util.module_from_spec(spec)
        sys.modules[job["module"]] = mod
        spec.loader.exec_module(mod)
    fn = getattr(mod, job["name"])
    src = ASTSource(fn=fn, signature=job["signature"], constexprs=job["constexprs"], attrs=job["attrs"])
    buf = io.StringIO()
    t0 = time.time()
    with contextlib.redirect_stdout(buf):
        k = triton.compile(src, target=GPUTarget("cuda", job["arch"], 32), options=job["options"])
    secs = time.time() - t0
    arch = f"sm_{job['arch']}"
    usage = parse_ptxas(buf.getvalue())
    md = k.metadata._asdict() if hasattr(k.metadata, "_asdict") else dict(k.metadata.__dict__)
    name = md.get("name", job["name"])
    res = usage.get((arch, name))
    if res is None:
        raise RuntimeError(f"kernel_report: no ptxas resource usage for {name} ({arch}) in:\n{buf.getvalue()[-2000:]}")
    ptx = k.asm["ptx"]
    with tempfile.TemporaryDirectory() as tmp:
        cub = os.path.join(tmp, "k.cubin")
        with open(cub, "wb") as f:
            f.write(k.asm["cubin"])
        sass = subprocess.run([tool("cuobjdump"), "-sass", cub], capture_output=True, text=True, check=True).stdout
    fsass = split_sass(sass)
    sass_text = "\n".join(v for (a, f), v in fsass.items() if f == name)
    return dict(res, key=job["key"], fn=name, arch=arch, shared_dyn=int(md.get("shared", 0)),
                num_warps=int(md.get("num_warps", job["options"].get("num_warps", 4))),
                num_stages=int(md.get("num_stages", job["options"].get("num_stages", 0))),
                sass=sass_facts(sass_text), ptx=ptx_facts(ptx), compile_s=secs)


# ============================================================================= CUDA: nvcc per source file
NVCC_FLAGS = ["-O3", "-std=c++17", "--expt-relaxed-constexpr"]  # setup.py's build_cuda, less -fPIC


def cuda_sources():
    """The .cu files of the _cuda module (csrc/sources.txt)."""
    out = []
    for line in (ROOT / "csrc" / "sources.txt").read_text().splitlines():
        parts = line.split("#", 1)[0].split()
        if len(parts) == 2 and parts[0] == "_cuda" and parts[1].endswith(".cu"):
            out.append(ROOT / "csrc" / parts[1])
    return out


def csrc_files():
    return [p for p in (ROOT / "csrc").rglob("*") if p.is_file() and p.suffix in (".cu", ".cuh", ".h", ".cpp", ".txt")]


def compile_cuda_file(job):
    """nvcc one .cu for every arch (device code only: a fatbin) with -Xptxas -v; returns
    {(arch, mangled): usage + facts + max threads}."""
    src, archs, nvcc = job["src"], job["archs"], job["nvcc"]
    flags = job.get("flags", [])
    with tempfile.TemporaryDirectory() as tmp:
        obj = os.path.join(tmp, "k.fatbin")
        gencode = [x for a in archs for x in ("-gencode", f"arch=compute_{a},code=sm_{a}")]
        cmd = [nvcc, *NVCC_FLAGS, *flags, *gencode, "-I", str(ROOT / "csrc" / "include"), "-Xptxas", "-v",
               "-fatbin", src, "-o", obj]
        t0 = time.time()
        p = subprocess.run(cmd, capture_output=True, text=True, cwd=str(ROOT))
        if p.returncode != 0:
            raise RuntimeError(f"kernel_report: nvcc failed on {src}:\n{p.stderr[-4000:]}")
        secs = time.time() - t0
        usage = parse_ptxas(p.stdout + p.stderr)
        cuobjdump = tool("cuobjdump")
        sass = split_sass(subprocess.run([cuobjdump, "-sass", obj], capture_output=True, text=True,
                                         check=True).stdout)
        threads = {}
        for a in archs:
            elf = subprocess.run([cuobjdump, "-elf", "-arch", f"sm_{a}", obj], capture_output=True, text=True,
                                 check=True).stdout
            threads[f"sm_{a}"] = parse_max_threads(elf)
    out = {}
    for (arch, fn), u in usage.items():
        out[(arch, fn)] = dict(u, sass=sass_facts(sass.get((arch, fn), "")), max_threads=threads[arch].get(fn, 0),
                               src=os.path.relpath(src, ROOT))
    return dict(functions=out, compile_s=secs)


# ============================================================================= CUDA: the launch probe
PROBE_CPP = r'''
// kernel_report.py's launch probe: replays recorded calls of fastlayers._cuda through the launch code of the
// kernel headers (compiled on top of the CPU emulation) and prints what each call would launch.
#include "cuda_emu.h"
#undef FL_GLOBAL
#define FL_GLOBAL  // external linkage: the instances keep their (nvcc-identical) mangled names for dladdr
#include "norm_kernels.cuh"
#include "mla_kernels.cuh"
#include "scan_kernels.cuh"

#include <dlfcn.h>
#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <map>
#include <sstream>
#include <string>
#include <vector>

using namespace fastlayers;
namespace ck = fastlayers::cuda_kernels;

struct Call {
  std::map<std::string, std::vector<std::string>> kv;
  std::vector<std::string> used;
  const std::vector<std::string>& get(const std::string& k) {
    auto it = kv.find(k);
    if (it == kv.end()) { std::fprintf(stderr, "probe: missing argument %s\n", k.c_str()); std::exit(3); }
    used.push_back(k);
    return it->second;
  }
  int64_t i(const std::string& k, int j = 0) { return std::stoll(get(k).at(j)); }
  double d(const std::string& k) { return std::stod(get(k).at(0)); }
  // Keyword arguments with a default in csrc/cuda/bindings.cpp: absent from a call that leaves them out.
  int64_t i_or(const std::string& k, int64_t dflt) { return kv.count(k) ? i(k) : dflt; }
  double d_or(const std::string& k, double dflt) { return kv.count(k) ? d(k) : dflt; }
  void* p(const std::string& k) { return reinterpret_cast<void*>(uintptr_t(std::stoull(get(k).at(0)))); }
  View4 v(const std::string& k) {
    const auto& x = get(k);
    View4 r{reinterpret_cast<void*>(uintptr_t(std::stoull(x.at(0)))), int(std::stoll(x.at(1))), {0, 0, 0, 0}};
    for (int j = 0; j < 4; ++j) r.s[j] = std::stoll(x.at(2 + j));
    return r;
  }
  void check_all_used() {
    for (auto& e : kv) {
      bool ok = e.first == "stream";
      for (auto& u : used) ok = ok || u == e.first;
      if (!ok) { std::fprintf(stderr, "probe: argument %s not understood\n", e.first.c_str()); std::exit(3); }
    }
  }
};

static int call_index = 0;
static void report(void* k, dim3 g, dim3 b, size_t smem) {
  Dl_info info{};
  const char* name = (dladdr(k, &info) && info.dli_sname) ? info.dli_sname : "?";
  std::printf("%d %s %u %u %u %u %u %u %zu\n", call_index, name, g.x, g.y, g.z, b.x, b.y, b.z, smem);
}

int main() {
  auto rec = [](auto k, dim3 g, dim3 b, const auto&...) { report(reinterpret_cast<void*>(k), g, b, 0); };
  auto rec_smem = [](auto k, dim3 g, dim3 b, size_t smem, const auto&...) {
    report(reinterpret_cast<void*>(k), g, b, smem);
  };
  std::string line;
  while (std::getline(std::cin, line)) {
    std::istringstream in(line);
    std::string entry, tok;
    in >> call_index >> entry;
    Call c;
    while (in >> tok) {
      auto eq = tok.find('=');
      std::vector<std::string> vals;
      std::stringstream vs(tok.substr(eq + 1));
      std::string v;
      while (std::getline(vs, v, ',')) vals.push_back(v);
      c.kv[tok.substr(0, eq)] = vals;
    }
    if (entry == "norm_fwd") {
      NormFwdArgs a{c.p("x"), c.i("x_stride"), int(c.i("x_dt")), c.p("r"), c.i("r_stride"), int(c.i("r_dt")),
                    c.p("w"), int(c.i("w_dt")), c.p("b"), int(c.i("b_dt")), c.p("y"), c.i("y_stride"),
                    int(c.i("y_dt")), c.p("h"), c.i("h_stride"), int(c.i("h_dt")), c.p("mean"), c.p("rstd"),
                    c.i("M"), c.i("N"), c.d("eps"), c.i("is_rms") != 0};
      a.offset = c.d_or("offset", 0.0);
      a.xhat_dt = int(c.i_or("xhat_dt", -1));
      c.check_all_used();
      ck::run_norm_fwd(a, rec);
    } else if (entry == "norm_bwd") {
      NormBwdArgs a{c.p("dy"), c.i("dy_stride"), int(c.i("dy_dt")), c.p("x"), c.i("x_stride"), int(c.i("x_dt")),
                    c.p("r"), c.i("r_stride"), int(c.i("r_dt")), c.p("w"), int(c.i("w_dt")), c.p("b"),
                    int(c.i("b_dt")), c.p("mean"), c.p("rstd"), c.p("dh"), c.i("dh_stride"), int(c.i("dh_dt")),
                    c.p("dx"), c.i("dx_stride"), int(c.i("dx_dt")), c.p("dr"), c.i("dr_stride"), int(c.i("dr_dt")),
                    c.p("dw_part"), c.p("db_part"), c.i("M"), c.i("N"), c.i("is_rms") != 0};
      a.offset = c.d_or("offset", 0.0);
      a.xhat_dt = int(c.i_or("xhat_dt", -1));
      int parts = int(c.i("parts"));
      c.check_all_used();
      ck::run_norm_bwd(a, parts, rec);
    } else if (entry == "mla_decode") {
      MlaDecodeArgs a{c.p("q"), c.i("q_strides", 0), c.i("q_strides", 1), c.i("q_strides", 2), int(c.i("q_dt")),
                      c.p("kv"), c.i("kv_sblock"), c.i("kv_srow"), int(c.i("kv_dt")),
                      static_cast<const int32_t*>(c.p("block_table")), c.i("bt_stride"),
                      static_cast<const int32_t*>(c.p("seqlens")), c.p("o_part"), c.p("lse_part"), c.p("out"),
                      int(c.i("out_dt")), c.p("lse"), c.i("B"), c.i("s_q"), c.i("H"), c.i("D"), c.i("dv"),
                      c.i("page"), c.i("n_splits"), c.i("split_tokens"), c.d("scale"), c.i("causal") != 0,
                      c.i("max_tokens")};
      a.h_kv = c.i_or("h_kv", 1);
      a.kv_shead = c.i_or("kv_shead", 0);
      c.check_all_used();
      ck::run_mla_decode(a, rec_smem);
    } else if (entry == "selective_scan_fwd" || entry == "selective_scan_bwd") {
      SelectiveScanArgs a{};
      a.u = c.v("u"); a.delta = c.v("delta"); a.A = c.v("A"); a.B = c.v("B"); a.C = c.v("C"); a.D = c.v("D");
      a.z = c.v("z"); a.delta_bias = c.v("delta_bias");
      a.batch = c.i("batch"); a.dim = c.i("dim"); a.L = c.i("L"); a.N = c.i("N"); a.GB = c.i("GB");
      a.GC = c.i("GC"); a.softplus = c.i("softplus") != 0;
      if (entry == "selective_scan_fwd") {
        a.out = c.v("out"); a.last = c.v("last");
        c.check_all_used();
        ck::run_selective_scan_fwd(a, rec_smem);
      } else {
        a.dout = c.v("dout"); a.dlast = c.v("dlast"); a.du = c.v("du"); a.ddelta = c.v("ddelta"); a.dz = c.v("dz");
        a.dA_part = c.p("dA_part"); a.dB_part = c.p("dB_part"); a.dC_part = c.p("dC_part");
        a.dD_part = c.p("dD_part"); a.dbias_part = c.p("dbias_part");
        a.dB_part_stride = c.i("dB_part_stride"); a.dC_part_stride = c.i("dC_part_stride");
        float* ckpt = static_cast<float*>(c.p("ckpt"));
        int parts = int(c.i("parts"));
        c.check_all_used();
        ck::run_selective_scan_bwd(a, ckpt, parts, rec_smem);
      }
    } else {
      std::fprintf(stderr, "probe: unknown entry %s\n", entry.c_str());
      return 3;
    }
  }
  return 0;
}
'''


def _flat(v):
    if isinstance(v, bool):
        return "1" if v else "0"
    if isinstance(v, (list, tuple)):
        return ",".join(_flat(x) for x in v)
    if isinstance(v, float):
        return repr(v)
    return str(int(v))


def probe_lines(calls):
    return "".join(f"{i} {entry} " + " ".join(f"{k}={_flat(v)}" for k, v in args.items()) + "\n"
                   for i, (_, entry, args) in enumerate(calls))


def build_probe(cache, cxx):
    """Compile the launch probe (cached by the kernel headers, the probe and the compiler)."""
    key = sha("probe", PROBE_CPP, tree_hash(csrc_files()), _version([cxx, "--version"]))
    exe = cache.root / "probe" / f"probe-{key}"
    if cache.enabled and exe.exists():
        return str(exe)
    exe.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "probe.cpp")
        Path(src).write_text(PROBE_CPP)
        out = os.path.join(tmp, "probe")
        cmd = [cxx, "-std=c++20", "-O0", "-rdynamic", "-I", str(ROOT / "csrc" / "cuda" / "emu"), "-I",
               str(ROOT / "csrc" / "cuda"), "-I", str(ROOT / "csrc" / "include"), src, "-o", out, "-ldl"]
        p = subprocess.run(cmd, capture_output=True, text=True)
        if p.returncode != 0:
            raise RuntimeError(f"kernel_report: the launch probe did not compile:\n{p.stderr[-4000:]}")
        shutil.move(out, exe)
    return str(exe)


def run_probe(exe, calls):
    """[(call index, mangled instance, grid, block, dynamic smem)] for the recorded _cuda calls."""
    p = subprocess.run([exe], input=probe_lines(calls), capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"kernel_report: the launch probe failed (out of step with csrc/cuda/bindings.cpp?):\n"
                           f"{p.stderr[-3000:]}")
    out = []
    for line in p.stdout.splitlines():
        i, name, *nums = line.split()
        nums = [int(x) for x in nums]
        out.append((int(i), name, tuple(nums[0:3]), tuple(nums[3:6]), nums[6]))
    return out


# ============================================================================= report
_DT_CODE = {"fp32": "f", "bf16": "b", "fp16": "h", "fp64": "d", "i64": "l", "i32": "i", "i16": "s", "i8": "c",
            "u8": "u", "i1": "1"}


def _short_cfg(job):
    """A compact description of a Triton job: #key, the pointer arguments' dtypes (f fp32, b bf16, h fp16,
    i int32, l int64, u uint8), the constexprs, warps and stages. Jobs of one kernel can differ only in
    the JIT's other specialisations (an int divisible by 16): the table's #cfg (the JSON's cfg) tells them
    apart, the same for both archs."""
    ptrs = "".join(_DT_CODE.get(v[1:], "?") for v in job["signature"].values()
                   if isinstance(v, str) and v.startswith("*"))
    parts = [ptrs]
    for (path, v) in sorted(job["constexprs"].items()):
        name = list(job["signature"])[path[0]]
        if v is None or v is False or name in ("debug",):
            continue
        parts.append(name if v is True else f"{name}={v}")
    parts.append(f"w{job['options'].get('num_warps')}")
    parts.append(f"s{job['options'].get('num_stages')}")
    return " ".join(parts)


def assemble(triton_results, triton_jobs_, cuda_results, cuda_launches, demangled):
    """One row per kernel instance x arch (x launch shape for CUDA instances launched with several)."""
    rows = []
    for key, res in triton_results.items():
        job = triton_jobs_[key]
        sweep = bool(job["labels"]) and all(" block_r " in lab for lab in job["labels"])
        threads = res["num_warps"] * 32
        smem = res["smem"] + res["shared_dyn"]
        ctas, warps, lim = occupancy(threads, res["regs"], smem)
        rows.append(dict(lang="triton", kernel=res["fn"], id=res["fn"], config=_short_cfg(job), arch=res["arch"],
                         regs=res["regs"], spill_st=res["spill_st"], spill_ld=res["spill_ld"], stack=res["stack"],
                         smem_static=res["smem"], smem_dyn=res["shared_dyn"], threads=threads, ctas=ctas,
                         warps=warps, limiter=lim, sass=res["sass"], ptx=res["ptx"], rows=job["labels"],
                         grids=job["grids"], launched=bool(job["labels"]) and not sweep, sweep=sweep, key=key,
                         cfg=job["cfg"], src=os.path.relpath(job["path"], ROOT)
                         if job["path"].startswith(str(ROOT)) else job["path"]))
    for (arch, fn), u in (cuda_results or {}).items():
        dm = demangled.get(fn, fn)
        sid = short_name(dm)
        shapes = {}
        for lab, block, grid, smem in cuda_launches.get(fn, []):
            threads = block[0] * block[1] * block[2]
            s = shapes.setdefault((threads, smem), dict(labels=[], grids=[]))
            if lab not in s["labels"]:
                s["labels"].append(lab)
            if grid not in s["grids"]:
                s["grids"].append(grid)
        if not shapes:
            shapes[(u["max_threads"], 0)] = dict(labels=[], grids=[])
        for (threads, smem_dyn), s in sorted(shapes.items()):
            ctas, warps, lim = occupancy(threads, u["regs"], u["smem"] + smem_dyn)
            rows.append(dict(lang="cuda", kernel=sid.split("<")[0], id=sid, config=dm, arch=arch, regs=u["regs"],
                             spill_st=u["spill_st"], spill_ld=u["spill_ld"], stack=u["stack"], smem_static=u["smem"],
                             smem_dyn=smem_dyn, threads=threads, ctas=ctas, warps=warps, limiter=lim, sass=u["sass"],
                             ptx=None, rows=s["labels"], grids=s["grids"], launched=bool(s["labels"]), sweep=False,
                             src=u["src"],
                             mangled=fn))
    rows.sort(key=lambda r: (r["lang"] != "triton", r["kernel"], r["id"], r["config"], r.get("cfg", ""),
                             r["smem_dyn"], r["arch"] != "sm_90"))
    return rows


def spills(r):
    return r["spill_st"] + r["spill_ld"]


def uses_local(r):
    return r["stack"] > 0 or r["sass"]["ldl"] > 0 or r["sass"]["stl"] > 0


def check_hot(rows, hot=None, exceptions=None, cuda_checked=True):
    """Apply the hot-kernel rule. Returns (problems, excepted): problems are strings (any -> exit 1)."""
    hot = HOT if hot is None else hot
    exceptions = EXCEPTIONS if exceptions is None else exceptions
    problems, excepted = [], []
    used = [False] * len(exceptions)
    timed = {r["kernel"] for r in rows if r["launched"]}
    for k in sorted(timed - set(hot)):
        problems.append(f"{k}: timed by GPU-table rows but not in HOT (add it with its rows)")
    langs = {"triton"} | ({"cuda"} if cuda_checked else set())
    for k in sorted(set(hot) - timed):
        lang = "triton" if k.startswith("_") else "cuda"
        if lang in langs:
            problems.append(f"{k}: listed in HOT but no GPU-table row launches it (remove it)")
    for r in rows:
        if not r["launched"] or r["kernel"] not in hot:
            continue
        bad = spills(r) > 0 or uses_local(r)
        hits = [i for i, (pat, arch, _) in enumerate(exceptions)
                if (fnmatch.fnmatchcase(r["id"], pat) or fnmatch.fnmatchcase(r["kernel"], pat))
                and arch in ("*", r["arch"])]
        if bad and hits:
            for i in hits:
                used[i] = True
            r["exception"] = exceptions[hits[0]][2]
            excepted.append(r)
        elif bad:
            problems.append(f"{r['id']} [{r['config']}] {r['arch']}: hot kernel with {r['spill_st']} B spill stores, "
                            f"{r['spill_ld']} B spill loads, {r['stack']} B stack, LDL {r['sass']['ldl']} / "
                            f"STL {r['sass']['stl']} (no exception listed)")
    for i, (pat, arch, reason) in enumerate(exceptions):
        if not used[i]:
            lang = "triton" if pat.startswith("_") else "cuda"
            if lang in langs:
                problems.append(f"exception {pat!r} ({arch}) matches no spilling hot kernel any more: remove it "
                                f"({reason})")
    return problems, excepted


def _kb(b):
    return f"{b / 1024:.1f}"


COLUMNS = ("kernel", "arch", "regs", "spill st/ld", "stack", "smem KB s+d", "thr", "CTA/SM", "warps/SM", "limit",
           "LDG128", "STG128", "LDGSTS128", "TC", "LDL/STL", "hot", "config / GPU-table rows")


def _status(r):
    if r["launched"] and r["kernel"] in HOT:
        return "hot (exc)" if r.get("exception") else "hot"
    return "timed" if r["launched"] else "sweep" if r["sweep"] else "-"


def table_lines(rows):
    """The screen table: one line per row, short columns, the configuration last."""
    def cells(r):
        s = r["sass"]
        tc = f"HGMMA {s['hgmma']}" if s["hgmma"] else f"HMMA {s['hmma']}" if s["hmma"] else "-"
        if r["lang"] == "triton":
            name, cfg = f"{r['id']} #{r['cfg']}", r["config"]
        else:
            name = r["id"]
            cfg = (f"{r['rows'][0]}" + (f" (+{len(r['rows']) - 1} rows)" if len(r["rows"]) > 1 else "")
                   if r["rows"] else r["src"])
        return [name, r["arch"], str(r["regs"]), f"{r['spill_st']}/{r['spill_ld']}", str(r["stack"]),
                f"{_kb(r['smem_static'])}+{_kb(r['smem_dyn'])}", str(r["threads"]), str(r["ctas"]), str(r["warps"]),
                r["limiter"], str(s["ldg128"]), str(s["stg128"]), str(s["ldgsts128"]), tc, f"{s['ldl']}/{s['stl']}",
                _status(r), cfg]
    body = [cells(r) for r in rows]
    widths = [max([len(h)] + [len(b[i]) for b in body]) for i, h in enumerate(COLUMNS)]
    left = (0, 1, 9, 13, 15)

    def fmt(cs):
        return "  ".join(c if i == len(cs) - 1 else c.ljust(w) if i in left else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cs, widths)))
    return [fmt(COLUMNS), fmt(["-" * w for w in widths])] + [fmt(b) for b in body]


def markdown_lines(rows):
    """The hot rows as a markdown table (for benchmarks/RESULTS.md)."""
    head = ("kernel", "arch", "regs", "spill st/ld B", "stack B", "smem KB s+d", "thr", "CTAs/SM", "warps/SM",
            "LDG/STG.128", "LDGSTS.128", "tensor cores", "LDL/STL")
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        s = r["sass"]
        tc = f"HGMMA {s['hgmma']}" if s["hgmma"] else f"HMMA {s['hmma']}" if s["hmma"] else "-"
        name = f"`{r['id']}` #{r['cfg']} {r['config']}" if r["lang"] == "triton" else f"`{r['id']}`"
        exc = " (exception)" if r.get("exception") else ""
        out.append("| " + " | ".join([name + exc, r["arch"], str(r["regs"]), f"{r['spill_st']}/{r['spill_ld']}",
                                      str(r["stack"]), f"{_kb(r['smem_static'])}+{_kb(r['smem_dyn'])}",
                                      str(r["threads"]), str(r["ctas"]), str(r["warps"]),
                                      f"{s['ldg128']}/{s['stg128']}", str(s["ldgsts128"]), tc,
                                      f"{s['ldl']}/{s['stl']}"]) + " |")
    return out


# ============================================================================= main
def _triton_worker_init():
    os.environ["TRITON_INTERPRET"] = "0"


def _run_cuda_launches(cache, calls, cxx):
    """Map mangled instance -> [(row label, block, grid, dynamic smem)] through the launch probe."""
    if not calls:
        return {}
    exe = build_probe(cache, cxx)
    key = sha("launches", exe, probe_lines(calls))
    res = cache.get("launches", key)
    if res is None:
        res = run_probe(exe, calls)
        cache.put("launches", key, res)
    out = {}
    for i, name, grid, block, smem in res:
        lab = " ".join(map(str, calls[i][0][:4]))
        out.setdefault(name, []).append((lab, block, grid, smem))
    return out


def _code_key(*objs):
    """Hash of this script's code that decides a cached artefact (not HOT/EXCEPTIONS: editing them recompiles
    nothing)."""
    import inspect
    return sha(*[inspect.getsource(o) if callable(o) else repr(o) for o in objs])


def analysis_key():
    return _code_key(compile_triton_job, compile_cuda_file, parse_ptxas, split_sass, parse_max_threads, sass_facts,
                     ptx_facts, {k: r.pattern for k, r in _SASS_FACTS.items()},
                     {k: r.pattern for k, r in _PTX_FACTS.items()}, NVCC_FLAGS)


def source_key():
    """Hash of what decides the captured launches: the Python sources, the GPU table, the tools."""
    spec = importlib.util.find_spec("fastlayers")
    pkg = Path(spec.origin).parent
    files = [p for p in pkg.rglob("*.py")] + [p for p in pkg.glob("_cuda*.so")]
    files += [BENCH / f for f in ("gpu_table.py", "gpu_table_hybridnorm.py", "gpu_table_mla.py", "gpu_table_ssd.py",
                                  "test_bench_hybridnorm.py")]
    code = _code_key(capture, _meta_as_cuda_mode, _NoDevice, _CudaRecorder, triton_jobs, _CUDA_ENTRIES)
    return sha("capture", tree_hash(files), code, _pkg_version("torch"), _pkg_version("triton"), SMS, ARCHS)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", help="write the report (rows, hot-rule verdicts, timings) to this file")
    ap.add_argument("--cache-dir", default=default_cache_dir(), help="artefact cache (default %(default)s)")
    ap.add_argument("--no-cache", action="store_true", help="recompile everything (the cache is still written)")
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="parallel compiles")
    ap.add_argument("--hot-only", action="store_true", help="print only the rows of hot kernels")
    ap.add_argument("--md", help="write the hot rows as a markdown table to this file")
    ap.add_argument("--no-cuda", action="store_true", help="skip the CUDA half")
    ap.add_argument("--sweep", action="store_true",
                    help="also compile the MLA tuning sweep's configurations (reported, not under the hot rule)")
    a = ap.parse_args(argv)
    t_start = time.time()
    cache = Cache(a.cache_dir, enabled=not a.no_cache)
    notes = []

    # 1. the launches of the GPU table
    ckey = sha(source_key(), a.sweep)
    cap = cache.get("capture", ckey)
    if cap is None:
        launches, calls, cap_notes = capture(sweep=a.sweep)
        jobs = triton_jobs(launches)
        calls = [(lab, e, args) for lab, e, args in calls]
        cap = dict(jobs=jobs, calls=calls, notes=cap_notes)
        cache.put("capture", ckey, cap)
    jobs, calls = cap["jobs"], cap["calls"]
    notes += cap["notes"]
    t_capture = time.time() - t_start

    # 2. what to compile: Triton jobs, CUDA files (cached results first)
    nvcc, cxx = find_nvcc(), shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")
    cuobjdump = tool("cuobjdump")
    if cuobjdump is None:
        sys.exit("kernel_report: cuobjdump not found (neither the CUDA toolkit's nor triton's)")
    do_cuda = not a.no_cuda and nvcc is not None
    if a.no_cuda:
        notes.append("CUDA half skipped: --no-cuda")
    elif nvcc is None:
        notes.append("CUDA half skipped: nvcc not found (set CUDA_HOME or put nvcc on PATH)")
    akey = analysis_key()
    triton_results, todo = {}, []
    cost = {"_ssd_bwd_chunk_kernel": 3, "_ssd_fwd_kernel": 2, "_mla_split_kernel": 2}  # longest first
    for key, job in sorted(jobs.items(), key=lambda kv: -cost.get(kv[1]["name"], 1)):
        r = cache.get("triton", sha(key, akey))
        if r is None:
            todo.append(("triton", key, job))
        else:
            triton_results[key] = r
    cuda_results = {}
    if do_cuda:
        nvcc_version = _version([nvcc, "--version"])
        headers = tree_hash(csrc_files())
        for src in cuda_sources():
            key = sha("nvcc", str(src.relative_to(ROOT)), headers, nvcc_version, akey, ARCHS,
                      _version([cuobjdump, "--version"]))
            r = cache.get("cuda", key)
            if r is None:
                todo.insert(0, ("cuda", key, dict(src=str(src), archs=ARCHS, nvcc=nvcc)))
            else:
                cuda_results[src] = r
    t0 = time.time()
    cuda_checked = do_cuda and bool(calls) and cxx is not None
    if do_cuda and not calls:
        notes.append("CUDA hot rule not checked: no CUDA launches captured")
    elif do_cuda and cxx is None:
        notes.append("CUDA hot rule not checked: no C++ compiler for the launch probe")
    probe = concurrent.futures.ThreadPoolExecutor(1)  # the launch probe (g++, ~3 s) next to the compiles
    launches_fut = probe.submit(_run_cuda_launches, cache, calls, cxx) if cuda_checked else None
    if todo:
        print(f"compiling {sum(t[0] == 'triton' for t in todo)} Triton kernels and "
              f"{sum(t[0] == 'cuda' for t in todo)} CUDA files with {a.jobs} workers ...", flush=True)
        import multiprocessing
        ctx = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(a.jobs, mp_context=ctx, initializer=_triton_worker_init) as pool:
            futs = {pool.submit(compile_cuda_file if kind == "cuda" else compile_triton_job, job): (kind, key, job)
                    for kind, key, job in todo}
            for f in concurrent.futures.as_completed(futs):
                kind, key, job = futs[f]
                r = f.result()
                cache.put(kind, sha(key, akey) if kind == "triton" else key, r)
                if kind == "triton":
                    triton_results[key] = r
                else:
                    cuda_results[Path(job["src"])] = r
    cuda_launches = launches_fut.result() if launches_fut else {}
    probe.shutdown()
    t_compile = time.time() - t0

    functions = {}
    for r in cuda_results.values():
        functions.update(r["functions"])
    dm = demangle([fn for _, fn in functions]) if functions else {}
    rows = assemble(triton_results, jobs, functions, cuda_launches, dm)
    problems, excepted = check_hot(rows, cuda_checked=cuda_checked)
    compiled = {fn for _, fn in functions}
    for name in sorted(set(cuda_launches) - compiled):
        problems.append(f"the launch probe launches {name}, which the nvcc compile of csrc/cuda does not contain")

    shown = [r for r in rows if r["launched"] and r["kernel"] in HOT] if a.hot_only else rows
    print("\n".join(table_lines(shown)))
    n_tr = sum(r["lang"] == "triton" for r in rows)
    print(f"\n{len(rows)} rows ({n_tr} Triton, {len(rows) - n_tr} CUDA) for {', '.join(f'sm_{x}' for x in ARCHS)}; "
          f"occupancy on an H100/H200 SM (65,536 regs, 2,048 threads, 32 CTAs, 228 KB smem)")
    spilling = [r for r in rows if spills(r) or uses_local(r)]
    if spilling:
        print("spilling / local memory today:")
        for r in spilling:
            tag = "hot, excepted: " + r["exception"] if r.get("exception") else (
                "hot" if r["launched"] and r["kernel"] in HOT else "tuning sweep only" if r["sweep"] else
                "not launched by the GPU table")
            print(f"  {r['id']} {r['arch']}: spill {r['spill_st']}/{r['spill_ld']} B, stack {r['stack']} B "
                  f"({tag})" + (f" [{r['config']}]" if r["lang"] == "triton" else ""))
    for n in notes:
        print("note:", n)
    elapsed = time.time() - t_start
    import resource
    cpu = sum(getattr(resource.getrusage(w), f) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
              for f in ("ru_utime", "ru_stime"))
    print(f"kernel_report: {elapsed:.1f} s wall, {cpu:.0f} s CPU (capture {t_capture:.1f} s, compile "
          f"{t_compile:.1f} s; cache {cache.hits} hits, {cache.misses} misses in {cache.root})")
    if a.md:
        Path(a.md).write_text("\n".join(markdown_lines([r for r in rows if r["launched"] and r["kernel"] in HOT]))
                              + "\n")
        print(f"wrote {a.md}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dict(date=time.strftime("%Y-%m-%d"), archs=[f"sm_{x}" for x in ARCHS],
                           limits=dict(regs=SM_REGS, threads=SM_THREADS, ctas=SM_CTAS, smem=SM_SMEM,
                                       smem_per_cta=CTA_SMEM_MAX, reg_unit=REG_UNIT, smem_reserved=SMEM_RESERVED),
                           tools=dict(triton=_pkg_version("triton"), torch=_pkg_version("torch"),
                                      nvcc=_version([nvcc, "--version"]).splitlines()[-1] if nvcc else None),
                           hot=HOT, exceptions=[list(e) for e in EXCEPTIONS], problems=problems, notes=notes,
                           seconds=round(elapsed, 1), cpu_seconds=round(cpu, 1), rows=rows),
                      f, indent=1, default=str)
        print(f"wrote {a.json}")
    if problems:
        print(f"\nkernel_report: FAILED ({len(problems)}):")
        for p in problems:
            print("  " + p)
        return 1
    print(f"kernel_report: OK (hot kernels: no spills, no local memory; {len(excepted)} excepted rows)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
