"""HybridNorm rows of the GPU table (benchmarks/gpu_table.py).

- qkv_norm_rope and swiglu, forward and forward+backward: fastlayers vs the eager composition
  (benchmarks/test_bench_hybridnorm.py) and torch.compile of it; GB/s and % of the copy ceiling.
- QKV-norm attention, forward+backward at 16k tokens, head_dim 64 and 128: qkv_norm_rope on the
  fused projection output + SDPA, against SDPA alone on already-normalised q, k, v. Target <= 1.15x.
- HybridNormBlock forward+backward (bf16): fastlayers vs the reference block, eager and compiled.
"""
import torch
import torch.nn.functional as F

import fastlayers
from fastlayers import reference

from test_bench_hybridnorm import _eager_swiglu, eager_qkv_norm_rope

_compiled = {}


def _compile(key, fn):
    if key not in _compiled:
        _compiled[key] = torch.compile(fn, dynamic=False)
    return _compiled[key]


def _row(op, shape, dtype, prov, t, nbytes, ceiling):
    if t != t:
        return (op, shape, str(dtype)[6:], prov, float("nan"), float("nan"), "ERROR")
    gbps = nbytes / t / 1e9
    return (op, shape, str(dtype)[6:], prov, t * 1e6, gbps, f"{gbps / ceiling:.0%}")


def _timed(gt, fn, sets, rows, label):
    try:
        return gt.bench(fn, sets)
    except Exception as e:  # report, don't hide
        rows.append((*label, float("nan"), float("nan"), f"ERROR {type(e).__name__}: {e}"[:80]))
        return None


def _qkv_rows(gt, ceiling, l2, smoke, quick):
    dev = gt.DEVICE
    fast = "triton" if dev == "cuda" else "cpu"
    shape = (1, 16, 4, 2, 32) if smoke else (2, 8192, 32, 8, 128)
    b, t, hq, hkv, d = shape
    rows = []
    for backward in (False, True):
        for dtype in ((torch.float32,) if smoke else (torch.bfloat16,) if quick else (torch.bfloat16, torch.float32)):
            esz = torch.tensor([], dtype=dtype).element_size()
            per = b * t * (hq + 2 * hkv) * d * esz
            nbytes = (5 if backward else 2) * per
            cos, sin = reference.rope_tables(d, t, 500000.0, dev)
            sets = []
            for _ in range(gt.n_sets(nbytes, l2)):
                qkv = torch.randn(b, t, (hq + 2 * hkv) * d, device=dev, dtype=dtype, requires_grad=backward)
                ws = [(torch.rand(d, device=dev, dtype=dtype) + 0.5).requires_grad_(backward) for _ in range(3)]
                grads = [torch.randn(b, t, h, d, device=dev, dtype=dtype) for h in (hq, hkv, hkv)]
                sets.append((qkv, ws, grads))
            for prov in (fast, "eager", "compile"):
                if prov == fast:
                    def f(q, k, v, *a, _p=prov):
                        with fastlayers.use_backend(_p):
                            return fastlayers.qkv_norm_rope(q, k, v, *a)
                else:
                    f = eager_qkv_norm_rope if prov == "eager" else _compile(("qkv", backward), eager_qkv_norm_rope)

                def call(s, f=f):
                    qkv, ws, grads = s
                    x = qkv.view(b, t, hq + 2 * hkv, d)
                    outs = f(x[:, :, :hq], x[:, :, hq:hq + hkv], x[:, :, hq + hkv:], *ws, cos, sin)
                    if backward:
                        qkv.grad = None
                        for w in ws:
                            w.grad = None
                        torch.autograd.backward(outs, grads)

                op = "qkv_norm_rope" + (" fwd+bwd" if backward else " fwd")
                label = (op, f"{b}x{t}x{hq}/{hkv}x{d}", str(dtype)[6:], prov)
                with torch.enable_grad() if backward else torch.no_grad():
                    tm = _timed(gt, call, sets, rows, label)
                if tm is not None:
                    rows.append(_row(op, label[1], dtype, prov, tm, nbytes, ceiling))
            del sets
    return rows


def _swiglu_rows(gt, ceiling, l2, smoke, quick):
    dev = gt.DEVICE
    fast = "triton" if dev == "cuda" else "cpu"
    tok, f_ = (16, 64) if smoke else (16384, 4096)
    rows = []
    for backward in (False, True):
        dtype = torch.float32 if smoke else torch.bfloat16
        per = tok * f_ * torch.tensor([], dtype=dtype).element_size()
        nbytes = (8 if backward else 3) * per
        sets = [(torch.randn(tok, 2 * f_, device=dev, dtype=dtype, requires_grad=backward),
                 torch.randn(tok, f_, device=dev, dtype=dtype)) for _ in range(gt.n_sets(nbytes, l2))]
        for prov in (fast, "eager", "compile"):
            if prov == fast:
                def f(x, _p=prov):
                    with fastlayers.use_backend(_p):
                        return fastlayers.swiglu(x)
            else:
                f = _eager_swiglu if prov == "eager" else _compile(("swiglu", backward), _eager_swiglu)

            def call(s, f=f):
                x, dout = s
                y = f(x)
                if backward:
                    x.grad = None
                    y.backward(dout)

            op = "swiglu" + (" fwd+bwd" if backward else " fwd")
            label = (op, f"{tok}x{f_}", str(dtype)[6:], prov)
            with torch.enable_grad() if backward else torch.no_grad():
                tm = _timed(gt, call, sets, rows, label)
            if tm is not None:
                rows.append(_row(op, label[1], dtype, prov, tm, nbytes, ceiling))
    return rows


def _attention_rows(gt, smoke):
    """fwd+bwd of (qkv_norm_rope + SDPA) against SDPA alone on normalised inputs: the 1.15x target."""
    dev = gt.DEVICE
    dtype = torch.float32 if smoke else torch.bfloat16
    rows = []
    for d in (64, 128):
        b, t, hq, hkv = (1, 32, 4, 2) if smoke else (1, 16384, 32, 8)
        cos, sin = reference.rope_tables(d, t, 500000.0, dev)
        ws = [torch.rand(d, device=dev, dtype=dtype) + 0.5 for _ in range(3)]

        def sdpa(q, k, v):
            return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                  is_causal=True, enable_gqa=hq != hkv)

        sets = []
        for _ in range(2):
            qkv = torch.randn(b, t, (hq + 2 * hkv) * d, device=dev, dtype=dtype, requires_grad=True)
            with torch.no_grad():
                normed = [x.detach().requires_grad_() for x in
                          fastlayers.qkv_norm_rope_packed(qkv, hq, hkv, *ws, cos, sin)]
            sets.append((qkv, normed, torch.randn(b, hq, t, d, device=dev, dtype=dtype)))

        def fused(s):
            qkv, _, go = s
            qkv.grad = None
            q, k, v = fastlayers.qkv_norm_rope_packed(qkv, hq, hkv, *ws, cos, sin)
            sdpa(q, k, v).backward(go)

        def alone(s):
            _, (q, k, v), go = s
            for x in (q, k, v):
                x.grad = None
            sdpa(q, k, v).backward(go)

        shape = f"{b}x{t}x{hq}/{hkv}x{d}"
        t_alone = _timed(gt, alone, sets, rows, ("SDPA alone fwd+bwd", shape, str(dtype)[6:], "torch"))
        t_fused = _timed(gt, fused, sets, rows, ("QKV-norm attention fwd+bwd", shape, str(dtype)[6:], "fastlayers"))
        if t_alone and t_fused:
            rows.append(("SDPA alone fwd+bwd", shape, str(dtype)[6:], "torch", t_alone * 1e6, float("nan"), "1.00x"))
            ratio = t_fused / t_alone
            rows.append(("QKV-norm attention fwd+bwd", shape, str(dtype)[6:], "fastlayers", t_fused * 1e6,
                         float("nan"), f"{ratio:.3f}x SDPA ({'ok' if ratio <= 1.15 else 'MISS'}: target <= 1.15x)"))
    return rows


def _block_rows(gt, smoke):
    dev = gt.DEVICE
    dtype = torch.float32 if smoke else torch.bfloat16
    c = (dict(dim=64, heads=4, kv=2, ffn=96, b=2, t=16) if smoke else
         dict(dim=2048, heads=16, kv=4, ffn=5632, b=4, t=2048))
    args = (c["dim"], c["heads"], c["kv"], c["ffn"], "hybrid")
    torch.manual_seed(0)
    fast = fastlayers.HybridNormBlock(*args, max_seq_len=c["t"]).to(dev, dtype)
    ref = reference.HybridNormBlock(*args, max_seq_len=c["t"]).to(dev, dtype)
    ref.load_state_dict(fast.state_dict())
    x = torch.randn(c["b"], c["t"], c["dim"], device=dev, dtype=dtype, requires_grad=True)
    dy = torch.randn_like(x)
    rows, times = [], {}
    shape = f"{c['b']}x{c['t']}x{c['dim']}"
    for prov, m in (("fastlayers", fast), ("reference", ref), ("reference-compile", _compile("block", ref))):
        def step(_s, m=m):
            x.grad = None
            for p in m.parameters():
                p.grad = None
            m(x).backward(dy)
        tm = _timed(gt, step, [None], rows, ("HybridNormBlock fwd+bwd", shape, str(dtype)[6:], prov))
        if tm is not None:
            times[prov] = tm
    for prov, tm in times.items():
        tok_s = c["b"] * c["t"] / tm
        vs = "; ".join(f"{times[o] / tm:.2f}x vs {o}" for o in times if o != prov and prov == "fastlayers")
        rows.append(("HybridNormBlock fwd+bwd", shape, str(dtype)[6:], prov, tm * 1e6, float("nan"),
                     f"{tok_s / 1e3:.1f}k tok/s" + (f"; {vs}" if vs else "")))
    return rows


def hybridnorm_rows(gt, ceiling, l2, quick=False, smoke=False):
    rows = _qkv_rows(gt, ceiling, l2, smoke, quick) + _swiglu_rows(gt, ceiling, l2, smoke, quick)
    rows += _attention_rows(gt, smoke) + _block_rows(gt, smoke)
    if gt.DEVICE == "cuda":
        torch.cuda.empty_cache()
    return rows
