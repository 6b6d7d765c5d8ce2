"""Model-level steps of benchmarks/gpu_check.sh: torch.compile of a training step, and decode tokens/s.

    python benchmarks/gpu_models.py compile [--device cuda] [--steps 8] [--json compile.json]
    python benchmarks/gpu_models.py decode [--device cuda] [--json decode.json]
    python benchmarks/gpu_models.py merge RESULTS.json [PART.json ...]   # gpu_check.sh: fold parts into the run's JSON
    ... --tiny: small shapes and few steps (gpu_check.sh's CPU dry run)

compile: trains hybridnorm-tiny for --steps steps twice from the same seed, initialisation and data, eagerly
and with ``torch.compile`` of the model (fastlayers.train's --compile: forward and backward through the
registered custom ops), under bf16 autocast on a GPU (fp32 on the CPU), and compares the two loss curves
with check-reference's rule, ``|loss_compiled - loss_eager| <= tol * loss_eager`` each step (tol:
fastlayers.train.CHECK_TOLERANCE of the dtype). Reports both runs' steady-state tokens/s and the warm-up
time (the compile lands in the first steps), and the graph breaks dynamo counted. Exit code 1 on a mismatch.

decode: greedy decode tokens/s of zebra-small (MLA + Mamba-2) and hybridnorm-small, fastlayers against the
pure-PyTorch reference model with the same weights (zebra: ``ZebraLM.reference_copy()``; hybridnorm:
``models.build(preset, reference=True)``), bf16 on a GPU. Each round prefills a fresh cache with a --prompt
token prompt (not timed), then times --new one-token decode steps of the whole batch; the median of
--rounds rounds after one warm-up round; tokens/s = batch x new / that time.
"""
import argparse
import json
import math
import os
import statistics
import sys
import time
from dataclasses import asdict, replace

import torch

from fastlayers import models, train


def _sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def _finite(v):
    """NaN / inf -> None, recursively (strict JSON has neither)."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_finite(x) for x in v]
    return v


def _write(path, obj):
    if path:
        with open(path, "w") as f:
            json.dump(_finite(obj), f, indent=1, default=str, allow_nan=False)
            f.write("\n")


# --------------------------------------------------------------------------------------------- compile
def _graph_breaks():
    try:
        from torch._dynamo.utils import counters
        return sum(counters["graph_break"].values())
    except Exception:  # noqa: BLE001 - an internal counter: report None where it moved
        return None


def compile_check(a):
    dev = a.device
    dtype = "bf16" if dev.startswith("cuda") else "fp32"
    steps = 3 if a.tiny else a.steps
    cfg = train.Config(preset="hybridnorm-tiny", steps=steps, batch=2 if a.tiny else 8, seq_len=32 if a.tiny else 128,
                       device=dev, dtype=dtype, eval_every=steps, eval_batches=1, timing_warmup=min(2, steps - 1),
                       data_bytes=256 << 10 if a.tiny else 0, seed=0)
    if a.tiny:
        cfg.model_args = dict(n_layers=2, dim=64, ffn_hidden=160)
    tol = train.CHECK_TOLERANCE[dtype]
    out = dict(kind="compile", preset=cfg.preset, config=asdict(cfg), tolerance=tol)
    t0 = time.perf_counter()
    eager = train.train(cfg, progress=False)
    try:
        before = _graph_breaks()
        comp = train.train(replace(cfg, compile=True), progress=False)
        after = _graph_breaks()
    except Exception as e:  # noqa: BLE001 - the step's failure is its result
        out.update(ok=False, error=f"{type(e).__name__}: {e}"[:2000], eager=eager.summary)
        print(f"compile check: torch.compile training FAILED: {type(e).__name__}: {e}"[:600])
        _write(a.json, out)
        return 1
    ok, lines, worst = train.compare_curves(comp.losses, eager.losses, tol)
    e, c = eager.summary, comp.summary
    out.update(ok=ok, max_rel_diff=worst, losses_eager=eager.losses, losses_compiled=comp.losses, eager=e, compiled=c,
               graph_breaks=None if before is None or after is None else after - before,
               seconds=time.perf_counter() - t0)
    if not ok:
        print("\n".join(lines))
    print(f"compile check ({cfg.preset}, {steps} steps of {cfg.batch} x {cfg.seq_len}, {dev} {dtype}): "
          f"compiled vs eager max relative loss difference {worst:.2e} (tolerance {tol:g}): {'PASS' if ok else 'FAIL'}")
    print(f"  steady state (after {c['warmup_steps']} steps): compiled {c['steady_tokens_per_s']:,.0f} tokens/s, "
          f"eager {e['steady_tokens_per_s']:,.0f} tokens/s; warm-up (compile) {c['warmup_seconds']:.1f} s vs eager "
          f"{e['warmup_seconds']:.1f} s; graph breaks {out['graph_breaks']}")
    _write(a.json, out)
    return 0 if ok else 1


# ---------------------------------------------------------------------------------------------- decode
def _pair(preset, device, dtype, overrides):
    torch.manual_seed(0)
    fast = models.build(preset, **overrides).to(device, dtype).eval()
    if isinstance(fast, models.ZebraLM):
        ref = fast.reference_copy().eval()
    else:
        ref = models.build(preset, reference=True, **overrides).to(device, dtype).eval()
        ref.load_state_dict(fast.state_dict())
    return fast, ref


def _decode_time(m, batch, prompt_len, new, rounds, device):
    g = torch.Generator().manual_seed(batch)
    prompt = torch.randint(0, m.vocab_size, (batch, prompt_len), generator=g).to(device)
    times = []
    with torch.no_grad():
        for r in range(rounds + 1):  # round 0 warms up (Triton compiles, autotuning)
            cache = m.new_cache(batch, prompt_len + new)
            logits, _ = m(prompt, cache=cache)
            tok = logits[:, -1:].argmax(-1)
            _sync(device)
            t = time.perf_counter()
            for _ in range(new):
                logits, _ = m(tok, cache=cache)
                tok = logits[:, -1:].argmax(-1)
            _sync(device)
            if r:
                times.append(time.perf_counter() - t)
    return statistics.median(times)


def decode(a):
    dev = a.device
    dtype = torch.bfloat16 if dev.startswith("cuda") else torch.float32
    tiny = dict(dim=64, n_layers=4, n_heads=4, n_kv_heads=2, ffn_hidden=96)
    presets = {"zebra-small": dict(tiny, head_dim=16, mla_layers=[0, 2]) if a.tiny else {},
               "hybridnorm-small": tiny if a.tiny else {}}
    batches = (1, 2) if a.tiny else (1, 16)
    prompt, new, rounds = (8, 4, 1) if a.tiny else (a.prompt, a.new, a.rounds)
    rows = []
    print(f"decode tokens/s ({dev}, {str(dtype)[6:]}; prompt {prompt}, {new} new tokens, median of {rounds} rounds)")
    for preset, over in presets.items():
        fast, ref = _pair(preset, dev, dtype, over)
        for batch in batches:
            res = {}
            for prov, m in (("fastlayers", fast), ("reference", ref)):
                try:
                    t = _decode_time(m, batch, prompt, new, rounds, dev)
                    res[prov] = batch * new / t
                    rows.append(dict(preset=preset, overrides=over, batch=batch, prompt=prompt, new_tokens=new,
                                     provider=prov, status="ok", ms_per_step=1e3 * t / new, tokens_per_s=res[prov]))
                except Exception as e:  # noqa: BLE001 - report, don't hide
                    rows.append(dict(preset=preset, overrides=over, batch=batch, prompt=prompt, new_tokens=new,
                                     provider=prov, status="error", error=f"{type(e).__name__}: {e}"[:300]))
                    print(f"  {preset} batch {batch} {prov}: ERROR {type(e).__name__}: {e}"[:300])
            if len(res) == 2:
                print(f"  {preset:<17} batch {batch:>3}: fastlayers {res['fastlayers']:>10,.0f} tokens/s, reference "
                      f"{res['reference']:>10,.0f} tokens/s ({res['fastlayers'] / res['reference']:.2f}x)")
        del fast, ref
    _write(a.json, dict(kind="decode", device=dev, dtype=str(dtype)[6:], rows=rows))
    return 0 if all(r["status"] == "ok" for r in rows) else 1


# ----------------------------------------------------------------------------------------------- merge
def merge(a):
    """Fold gpu_check.sh's part files (training, compile, decode, profile, the step times) into the run's JSON
    under ``models`` and ``gpu_check``; a part that is missing or unreadable is recorded as such."""
    with open(a.results) as f:
        doc = json.load(f)
    parts = {}
    for p in a.parts:
        name = os.path.splitext(os.path.basename(p))[0]
        try:
            with open(p) as f:
                parts[name] = json.load(f)
        except (OSError, ValueError) as e:
            parts[name] = dict(missing=f"{type(e).__name__}: {e}"[:300])
    steps = parts.pop("gpu_check", None)
    doc.setdefault("models", {}).update(parts)
    if steps is not None:
        doc["gpu_check"] = steps
    _write(a.results + ".tmp", doc)
    os.replace(a.results + ".tmp", a.results)
    print(f"merged {', '.join(parts) or 'nothing'}{' and the step times' if steps else ''} into {a.results}")
    return 0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("compile", "decode"):
        s = sub.add_parser(name)
        s.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
        s.add_argument("--tiny", action="store_true", help="small shapes, few steps (the CPU dry run)")
        s.add_argument("--json", help="write the result as JSON to this file")
        if name == "compile":
            s.add_argument("--steps", type=int, default=8)
        else:
            s.add_argument("--prompt", type=int, default=64)
            s.add_argument("--new", type=int, default=32)
            s.add_argument("--rounds", type=int, default=3)
    m = sub.add_parser("merge")
    m.add_argument("results")
    m.add_argument("parts", nargs="*")
    a = p.parse_args(argv)
    if a.cmd != "merge" and a.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no CUDA device")
    return {"compile": compile_check, "decode": decode, "merge": merge}[a.cmd](a)


if __name__ == "__main__":
    sys.exit(main())
