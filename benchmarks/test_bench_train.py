"""Training throughput: one optimizer step (forward, backward, AdamW) of the tiny/small presets.

Providers: ``fastlayers`` (the default backends: ``cpu`` kernels on CPU tensors), ``reference`` (every op
on the pure-PyTorch reference backend), each eager and under ``torch.compile``. Reports tokens/s and the
achieved FLOP/s (6 N per token, N the non-embedding parameters) in ``extra_info``.

    pytest benchmarks/test_bench_train.py --benchmark-only
``FASTLAYERS_BENCH_SMOKE=1`` runs one layer of the tiny preset on a few tokens (CI keeps the file alive).
"""
import pytest
import torch

import fastlayers
from fastlayers import train

from conftest import DEVICE, SMOKE

PRESETS = ["hybridnorm-tiny"] if SMOKE else ["hybridnorm-tiny", "hybridnorm-small", "zebra-tiny"]
BATCH, SEQ = (2, 16) if SMOKE else (8, 256)
_models = {}


def _setup(preset, backend, compiled):
    torch.manual_seed(0)
    model = train.build_model(preset, SEQ, **({"n_layers": 1} if SMOKE else {})).to(DEVICE)
    opt = torch.optim.AdamW(train.param_groups(model, 0.1), lr=1e-3, betas=(0.9, 0.95))
    net = torch.compile(model) if compiled else model
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (BATCH, SEQ + 1), generator=g).to(DEVICE)
    bk = None if backend == "fastlayers" else backend

    def step():
        with fastlayers.use_backend(bk):
            with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=DEVICE == "cuda"):
                _, loss = net(x[:, :-1], labels=x[:, 1:])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
        return loss

    return model, step


# Smoke mode compiles only the fastlayers model (compiling the reference too doubles CI time for no coverage).
CASES = [(p, b, c) for p in PRESETS for b in ("fastlayers", "reference") for c in (False, True)
         if not (SMOKE and c and b == "reference")]


@pytest.mark.parametrize("preset, backend, compiled", CASES,
                         ids=[f"{p}-{b}-{'compile' if c else 'eager'}" for p, b, c in CASES])
def test_train_step(benchmark, preset, backend, compiled):
    model, step = _setup(preset, backend, compiled)
    step()  # warm-up (and compilation)
    if DEVICE == "cuda":
        torch.cuda.synchronize()

    def call():
        step()
        if DEVICE == "cuda":
            torch.cuda.synchronize()

    benchmark.pedantic(call, rounds=1 if SMOKE else 5, iterations=1, warmup_rounds=0 if SMOKE else 1)
    _, n = train.count_params(model)
    tokens = BATCH * SEQ
    info = dict(preset=preset, backend=backend, compiled=compiled, tokens=tokens, non_embedding_params=n,
                device=DEVICE, threads=torch.get_num_threads())
    if benchmark.stats is not None:
        t = benchmark.stats.stats.median
        info.update(tokens_per_s=round(tokens / t, 1), gflops=round(6 * n * tokens / t / 1e9, 3))
    benchmark.extra_info.update(info)
