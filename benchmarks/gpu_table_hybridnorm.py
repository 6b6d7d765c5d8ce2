"""HybridNorm rows of the GPU table (benchmarks/gpu_table.py).

- qkv_norm_rope and swiglu, forward and forward+backward: fastlayers vs the eager composition
  (benchmarks/test_bench_hybridnorm.py), torch.compile of it, and Liger-Kernel (qkv_norm_rope: its RMSNorm on
  each of q, k, v over head_dim, then its RoPE on q, k, as a Liger user would compose them; swiglu: its fused
  gate-up SiLU-mul where the installed version has it, else SiLU-mul on the two halves); GB/s and % of the copy
  ceiling; the forward rows also time fastlayers' kernels alone.
- QKV-norm attention, forward+backward at 16k tokens, head_dim 64 and 128: qkv_norm_rope on the
  fused projection output + SDPA, against SDPA alone on already-normalised q, k, v. Target <= 1.15x.
- HybridNormBlock forward+backward (bf16): fastlayers vs the reference block, eager and compiled.
"""
import torch
import torch.nn.functional as F

import fastlayers
import gpu_peers as peers
from fastlayers import reference
from fastlayers.backends import load

from test_bench_hybridnorm import _eager_swiglu, eager_qkv_norm_rope

_compiled = {}


def _compile(key, fn):
    if key not in _compiled:
        _compiled[key] = torch.compile(fn, dynamic=False)
    return _compiled[key]


def _liger_qkv(lg):
    """Liger's pieces for per-head RMSNorm + RoPE: RMSNorm over head_dim on each of q, k, v (rows of D), then
    RoPE on q and k ((B, H, T, D) views of (B, T, H, D) memory, half-width tables: rotary_dim = D)."""
    def f(q, k, v, qw, kw, vw, cos, sin, eps=1e-5):
        d = q.shape[-1]
        qn, kn, vn = (lg.rms_norm.apply(x.reshape(-1, d), w, eps, 0.0, "llama", False).view(x.shape)
                      for x, w in ((q, qw), (k, kw), (v, vw)))
        t = q.shape[1]
        qr, kr = lg.rope.apply(qn.transpose(1, 2), kn.transpose(1, 2), cos[:t], sin[:t], None, 1, d)
        return qr.transpose(1, 2), kr.transpose(1, 2), vn
    return f


def _qkv_kernel(fast, b, t, hq, hkv, d, dtype, cos, sin):
    """fastlayers' head_norm_rope_fwd on q, k (RoPE) and v (norm only), outputs made once."""
    be = load(fast)
    dev = cos.device
    outs = [torch.empty(b, t, h, d, device=dev, dtype=dtype) for h in (hq, hkv, hkv)]
    ct, st = cos[:, : d // 2].float().contiguous(), sin[:, : d // 2].float().contiguous()
    offs = torch.zeros(b, dtype=torch.int64, device=dev)

    def kern(s):
        qkv, ws, _ = s
        x = qkv.view(b, t, hq + 2 * hkv, d)
        parts = (x[:, :, :hq], x[:, :, hq:hq + hkv], x[:, :, hq + hkv:])
        for i, (xi, wi, oi) in enumerate(zip(parts, ws, outs)):
            be.head_norm_rope_fwd(xi, wi, oi, *((ct, st, offs) if i < 2 else (None, None, None)), 1e-5)
    return kern


def _qkv_rows(gt, ceiling, l2, smoke, quick):
    dev = gt.DEVICE
    shape = (1, 16, 4, 2, 32) if smoke else (2, 8192, 32, 8, 128)
    b, t, hq, hkv, d = shape
    rows = []
    lg, why = peers.liger()
    if lg is None:
        gt.peer_missing_rows(rows, ("qkv_norm_rope",), "liger", why)
    provs = [("fastlayers", f) for f in gt.fast_backends() if f != "cuda"] + [("torch", "eager"), ("torch", "compile")]
    provs += [("liger", "triton")] if lg is not None else []
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
            for prov, backend in provs:
                if prov == "fastlayers":
                    def f(q, k, v, *a, _p=backend):
                        with fastlayers.use_backend(_p):
                            return fastlayers.qkv_norm_rope(q, k, v, *a)
                elif prov == "liger":
                    f = _liger_qkv(lg)
                else:
                    f = eager_qkv_norm_rope if backend == "eager" else _compile(("qkv", backward), eager_qkv_norm_rope)

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
                kern = _qkv_kernel(backend, b, t, hq, hkv, d, dtype, cos, sin) \
                    if prov == "fastlayers" and not backward else None
                note = "rms_norm x3 + rope (copies of the q, k, v slices)" if prov == "liger" else ""
                gt.timed_row(rows, (op, f"{b}x{t}x{hq}/{hkv}x{d}", dtype, prov, backend), call, sets, nbytes,
                             ceiling, grad=backward, kernel=kern, note=note)
            del sets
    return rows


def _swiglu_rows(gt, ceiling, l2, smoke, quick):
    dev = gt.DEVICE
    tok, f_ = (16, 64) if smoke else (16384, 4096)
    rows = []
    lg, why = peers.liger()
    if lg is None:
        gt.peer_missing_rows(rows, ("swiglu",), "liger", why)
    provs = [("fastlayers", f) for f in gt.fast_backends() if f != "cuda"] + [("torch", "eager"), ("torch", "compile")]
    provs += [("liger", "triton")] if lg is not None else []
    for backward in (False, True):
        dtype = torch.float32 if smoke else torch.bfloat16
        per = tok * f_ * torch.tensor([], dtype=dtype).element_size()
        nbytes = (8 if backward else 3) * per
        sets = [(torch.randn(tok, 2 * f_, device=dev, dtype=dtype, requires_grad=backward),
                 torch.randn(tok, f_, device=dev, dtype=dtype)) for _ in range(gt.n_sets(nbytes, l2))]
        for prov, backend in provs:
            note = ""
            if prov == "fastlayers":
                def f(x, _p=backend):
                    with fastlayers.use_backend(_p):
                        return fastlayers.swiglu(x)
            elif prov == "liger" and lg.fused_gate_up is not None:
                def f(x):
                    return lg.fused_gate_up.apply(x)
            elif prov == "liger":
                def f(x):
                    return lg.silu_mul.apply(x[:, :f_], x[:, f_:])
                note = "SiLU-mul on the two halves (copies them)"
            else:
                f = _eager_swiglu if backend == "eager" else _compile(("swiglu", backward), _eager_swiglu)

            def call(s, f=f):
                x, dout = s
                y = f(x)
                if backward:
                    x.grad = None
                    y.backward(dout)

            kern = None
            if prov == "fastlayers" and not backward:
                be, out = load(backend), torch.empty(tok, f_, device=dev, dtype=dtype)

                def kern(s, be=be, out=out):
                    be.swiglu_fwd(s[0][:, :f_], s[0][:, f_:], out)
            op = "swiglu" + (" fwd+bwd" if backward else " fwd")
            gt.timed_row(rows, (op, f"{tok}x{f_}", dtype, prov, backend), call, sets, nbytes, ceiling, grad=backward,
                         kernel=kern, note=note)
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
        t_alone = gt.timed_row(rows, ("SDPA alone fwd+bwd", shape, dtype, "torch", "sdpa"), alone, sets, None,
                               1.0, grad=True)
        r_alone = rows[-1]
        t_fused = gt.timed_row(rows, ("QKV-norm attention fwd+bwd", shape, dtype, "fastlayers", "default"), fused,
                               sets, None, 1.0, grad=True)
        if t_alone and t_fused:
            ratio = t_fused / t_alone
            gt._add_note(r_alone, "1.00x")
            gt._add_note(rows[-1], f"{ratio:.3f}x SDPA ({'ok' if ratio <= 1.15 else 'MISS'}: target <= 1.15x)")
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
    for prov, backend, m in (("fastlayers", "default", fast), ("torch", "eager (reference)", ref),
                             ("torch", "compile (reference)", _compile("block", ref))):
        def step(_s, m=m):
            x.grad = None
            for p in m.parameters():
                p.grad = None
            m(x).backward(dy)
        tm = gt.timed_row(rows, ("HybridNormBlock fwd+bwd", shape, dtype, prov, backend), step, [None], None, 1.0,
                          grad=True)
        if tm is not None:
            times[backend] = (tm, rows[-1])
    for backend, (tm, row) in times.items():
        tok_s = c["b"] * c["t"] / tm
        vs = "; ".join(f"{times[o][0] / tm:.2f}x vs {o}" for o in times if o != backend and backend == "default")
        gt._add_note(row, f"{tok_s / 1e3:.1f}k tok/s" + (f"; {vs}" if vs else ""))
    return rows


def hybridnorm_rows(gt, ceiling, l2, quick=False, smoke=False):
    rows = _qkv_rows(gt, ceiling, l2, smoke, quick) + _swiglu_rows(gt, ceiling, l2, smoke, quick)
    rows += _attention_rows(gt, smoke) + _block_rows(gt, smoke)
    if gt.DEVICE == "cuda":
        torch.cuda.empty_cache()
    return rows
