"""CPU threading: small ops run on one thread (no OpenMP team for a decode-sized op), the multi-part paths
of the kernels (per-thread partial sums) still match the reference when forced, and generate() decodes a
small model on one thread."""
import pytest
import torch

import fastlayers
from fastlayers import _layers, models
from fastlayers.backends import cpu as cpu_backend

from conftest import assert_close_to_ref


@pytest.fixture
def two_threads():
    n = torch.get_num_threads()
    torch.set_num_threads(max(2, n))
    yield
    torch.set_num_threads(n)


def test_small_work_runs_on_one_thread(two_threads):
    threads = torch.get_num_threads()
    assert cpu_backend._parts(1, 4096) == 1                 # one decode row
    assert cpu_backend._parts(64, 64 * 128) == 1            # 8K elements: below the bar
    assert cpu_backend._parts(4096, 4096 * 4096) == threads
    assert cpu_backend._parts(3, 1 << 30) == min(threads, 3)  # never more parts than rows
    assert cpu_backend._parts(8, 8 * 2048, per_thread=1 << 15) == 1


def _reference(fn):
    with fastlayers.use_backend("reference"):
        return fn()


def _grads(fn, *ts):
    for t in ts:
        t.grad = None
    out = fn()
    out = out if isinstance(out, tuple) else (out,)
    torch.autograd.backward(out, [torch.randn_like(o, generator=torch.Generator().manual_seed(9)) for o in out])
    return [o.detach() for o in out] + [t.grad for t in ts]


@pytest.mark.parametrize("op", ["rms_norm", "layer_norm", "qkv_norm_rope", "swiglu", "selective_state_update"])
def test_forced_multi_part_paths_match_reference(op, two_threads, monkeypatch):
    """With the bar at 1 element a thread, small shapes take the multi-part paths again (partial sums of
    dweight per part, a workspace per part): forward and gradients equal the reference."""
    monkeypatch.setattr(cpu_backend, "MIN_PER_THREAD", 1)
    calls = []
    real = cpu_backend._parts
    monkeypatch.setattr(cpu_backend, "_parts", lambda *a, **k: calls.append(real(*a, **k)) or calls[-1])
    g = torch.Generator().manual_seed(3)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    if op in ("rms_norm", "layer_norm"):
        x, r, w, b = rnd(7, 33), rnd(7, 33), rnd(33), rnd(33)
        ts = [x, r, w] + ([b] if op == "layer_norm" else [])
        f = (lambda: fastlayers.rms_norm(x, w, residual=r, prenorm=True)) if op == "rms_norm" else \
            (lambda: fastlayers.layer_norm(x, w, b, residual=r, prenorm=True))
    elif op == "qkv_norm_rope":
        q, k, v = rnd(2, 3, 4, 8), rnd(2, 3, 2, 8), rnd(2, 3, 2, 8)
        wq, wk, wv = rnd(8), rnd(8), rnd(8)
        cos, sin = fastlayers.reference.rope_tables(8, 16)
        ts = [q, k, v, wq, wk, wv]
        f = lambda: fastlayers.qkv_norm_rope(q, k, v, wq, wk, wv, cos, sin, eps=1e-5)  # noqa: E731
    elif op == "swiglu":
        x = rnd(5, 2 * 19)
        ts = [x]
        f = lambda: fastlayers.swiglu(x)  # noqa: E731
    else:
        state = rnd(3, 4, 8)
        x, dt, A, B, C = rnd(3, 4), rnd(3, 4), -rnd(4, 8).abs(), rnd(3, 8), rnd(3, 8)

        def f():
            s = state.clone()
            return fastlayers.selective_state_update(s, x, dt, A, B, C, dt_softplus=True), s
        ts = []
    for t in ts:
        t.requires_grad_()
    if ts:
        got, want = _grads(f, *ts), _reference(lambda: _grads(f, *ts))
    else:
        with torch.no_grad():
            got, want = list(f()), list(_reference(f))
    assert max(calls) >= 2, f"{op}: no multi-part launch ({calls})"
    for i, (a, b) in enumerate(zip(got, want)):
        assert_close_to_ref(a, b, b, f"{op} output/grad {i}")


def test_generate_decodes_a_small_model_on_one_thread(two_threads, monkeypatch):
    seen = []
    m = models.build("hybridnorm-tiny").eval()
    real = m.forward

    def spy(tokens, *a, **k):
        seen.append((tokens.shape[1], torch.get_num_threads()))
        return real(tokens, *a, **k)
    monkeypatch.setattr(m, "forward", spy)
    n = torch.get_num_threads()
    with torch.no_grad():
        m.generate(torch.randint(0, 256, (1, 5)), 3, temperature=0)
    assert seen[0] == (5, n)                     # the prefill keeps every thread
    assert seen[1:] == [(1, 1), (1, 1)]          # one-token steps of a 1.5M-parameter model: one thread
    assert torch.get_num_threads() == n          # restored
    # A model past the bar decodes on every thread.
    monkeypatch.setattr(_layers, "DECODE_PARALLEL_MIN_WORK", 1000)
    seen.clear()
    with torch.no_grad():
        m.generate(torch.randint(0, 256, (1, 5)), 2, temperature=0)
    assert seen == [(5, n), (1, n)]
