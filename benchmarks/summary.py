"""The summary a ``pytest benchmarks/ --benchmark-only`` run ends with (benchmarks/conftest.py prints it).

One block per op family (benchmark file), one line per (op, pass, shape, dtype, ...) and one column per
provider: median time, GB/s, % of the copy ceiling measured in the same run, and the speed-up over the
eager PyTorch provider (``xE``) and over torch.compile (``xC``) of the same line. Rows that count tokens
instead of bytes show tokens/s. Everything shown comes from each row's ``extra_info`` (also in
``--benchmark-json``) and its median.
"""
import os

# Providers the speed-ups divide by: the eager PyTorch composition and its torch.compile.
EAGER = ("eager", "reference", "eager-absorbed")
COMPILE = ("compile", "reference-compile")
# extra_info keys that describe a measurement rather than the case.
_MEASURED = {"provider", "bytes", "copy_gbps", "device", "device_name", "threads", "gbps", "fraction_of_copy",
             "tokens", "tokens_per_s", "params", "state_bytes", "overrides", "steps", "prompt"}
_ORDER = ("op", "pass_", "shape", "dtype")


def _fmt_time(t):
    if t >= 1:
        return f"{t:.2f}s"
    if t >= 1e-3:
        return f"{t * 1e3:.3g}ms"
    return f"{t * 1e6:.3g}us"


def _key(info):
    """The case a row measures: op, pass, shape, dtype, then any other descriptive key, in a fixed order."""
    keys = [k for k in _ORDER if k in info] + sorted(
        k for k in info if k not in _MEASURED and k not in _ORDER and not k.startswith(("speedup", "slowdown")))
    return tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in ((k, info[k]) for k in keys))


def _label(key):
    parts = []
    for k, v in key:
        if k == "shape":
            v = "x".join(map(str, v))
        elif k == "dtype":
            v = str(v).replace("torch.", "")
        elif k not in ("op", "pass_"):
            v = f"{k}={v}"
        parts.append(str(v))
    return " ".join(parts)


def _cell(row, eager, comp):
    t, info = row
    s = _fmt_time(t)
    if info.get("bytes"):
        gbps = info["bytes"] / t / 1e9
        s += f" {gbps:.3g}GB/s"
        if info.get("copy_gbps"):
            s += f" {gbps / info['copy_gbps']:.0%}"
    elif "tokens_per_s" in info:
        s += f" {info['tokens_per_s']:.4g}tok/s"
    if eager is not None and row is not eager:
        s += f" {eager[0] / t:.2f}xE"
    if comp is not None and row is not comp:
        s += f" {comp[0] / t:.2f}xC"
    return s


def _table(cases):
    """Lines of one op's table: a header of its providers, then a line per case."""
    providers = []
    for c in cases.values():
        providers += [p for p in c if p not in providers]
    first = lambda c, names: next((c[n] for n in names if n in c), None)  # noqa: E731
    cells = {k: {p: _cell(r, first(c, EAGER), first(c, COMPILE)) for p, r in c.items()} for k, c in cases.items()}
    labels = {k: _label(k) for k in cases}
    wl = max(len(v) for v in labels.values())
    wp = {p: max([len(p)] + [len(cells[k].get(p, "")) for k in cases]) for p in providers}
    out = [" | ".join([" " * wl] + [p.ljust(wp[p]) for p in providers]).rstrip()]
    for k in cases:
        out.append(" | ".join([labels[k].ljust(wl)] + [cells[k].get(p, "-").ljust(wp[p]) for p in providers]).rstrip())
    return out


def lines(benchmarks):
    """The summary's lines for pytest-benchmark's results (objects with .fullname, .extra_info, .stats):
    a block per family (benchmark file), in it a table per op."""
    families = {}
    for b in benchmarks:
        info = dict(b.extra_info)
        if not b or "provider" not in info:
            continue
        fam = os.path.basename(b.fullname.split("::")[0]).removesuffix(".py").removeprefix("test_bench_")
        ops = families.setdefault(fam, {}).setdefault(info.get("op", "?"), {})
        ops.setdefault(_key(info), {})[info["provider"]] = (b.stats.median, info)
    out = []
    for fam, ops in families.items():
        rows = [r for cases in ops.values() for c in cases.values() for r in c.values()]
        ceilings = sorted({r[1]["copy_gbps"] for r in rows if r[1].get("copy_gbps")})
        info = rows[0][1]
        head = f"--- {fam}: {info.get('device_name') or info.get('device', '?')}, {info.get('threads', '?')} threads"
        head += f", copy ceiling {ceilings[-1]:.3g} GB/s" if ceilings else ""
        out.append(head + " (time, GB/s, % of the ceiling, speed-up over torch eager xE / torch.compile xC) ---")
        for cases in ops.values():
            out += _table(cases)
    return out
