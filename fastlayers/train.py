"""The reference training loop: byte-level LM training of a fastlayers model on the Python stdlib.

    python -m fastlayers.train --preset hybridnorm-tiny --steps 200 --batch 8 --seq-len 128
    python -m fastlayers.train --preset hybridnorm-tiny --steps 30 --check-reference 30
    python -m fastlayers.train --preset hybridnorm-tiny --budget chinchilla
    python -m fastlayers.train --preset hybridnorm-tiny --steps 100 --compare-norms --out runs/norms
    python -m fastlayers.train ... --save ckpt --save-every 50      # then: --resume ckpt
    torchrun --nproc_per_node=2 -m fastlayers.train ...             # DDP (gloo on CPU, nccl on GPU)

Data (:mod:`fastlayers.data`): bytes of the standard library's ``*.py`` files, split by file; the
windows of step s depend only on (seed, s), and DDP ranks take their slice of the same global batch.

Optimiser: AdamW (betas 0.9, 0.95; eps 1e-8), linear warm-up to ``--lr`` over ``--warmup`` steps, then
cosine decay to ``--min-lr-ratio * lr`` at the last step; gradients clipped to total norm ``--clip``.
Weight decay (``--weight-decay``) applies to the weight matrices of the linear layers (parameters with
2+ dims, an untied LM head included) only: not to the token embedding (nor to the LM head when it is tied
to it), not to the norm gains, biases or other 1-D parameters (Mamba's A_log, D, dt_bias).
On CUDA the forward runs under bf16 autocast (``--dtype bf16``, the default there); CPU runs in fp32.

Counting: N is the number of non-embedding parameters (every parameter except the token embedding and
an untied LM head); D the number of training tokens; the summary's FLOPs are ``6 N D``
(:mod:`fastlayers.scaling`) and the achieved FLOP/s divide them by the training time (eval excluded).

``--check-reference N`` trains N steps with the default fastlayers backends, then N steps with every op
on the ``reference`` backend (pure PyTorch) from the same seed, initialisation and data, and compares the
two training-loss curves and the final validation loss: it fails (exit code 1, a per-step report) when
for any step ``|loss_fast - loss_ref| > tol * loss_ref``. ``tol`` (``--tolerance``) defaults to
``CHECK_TOLERANCE`` = 1e-5 in fp32. Measured on hybridnorm-tiny (batch 8 x 64, 100 steps, CPU): the
cpu kernels differ from the reference by at most 3.9e-7 relative (most steps bit-identical), a 25x
margin; the cpu SwiGLU forward scaled by 1.01 (a deliberately broken kernel) moves the loss by 3.5e-4
at step 1 (at least 2.5e-5 in each of the first 10 steps, up to 4.9e-2 later). Under bf16 autocast the
default is 2e-2 (a guess, not measured: no GPU here).

Speed: the summary's ``tokens_per_s`` divides all the run's tokens by its training time (eval excluded);
``steady_tokens_per_s`` leaves out the run's first ``--timing-warmup`` K steps (default min(5, max(1,
steps // 10))), where Triton compiles, autotuning and torch.compile land, and ``warmup_seconds`` reports
their time apart. The JSON also lists every step's time (``step_seconds``).

Checkpoints (``--save DIR``, every ``--save-every`` steps and at the end): ``DIR/step-NNNNNN/checkpoint.safetensors``
holds the model, the AdamW state, the torch RNG state; its metadata the step, the configuration and the
loss history. ``--resume`` (a checkpoint directory, or a ``--save`` directory: its latest step) continues
with per-step losses identical to an uninterrupted run (the data of a step depends only on the seed and
the step).
"""
import argparse
import csv
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from . import data as _data
from . import models, scaling
from .backend import use_backend

CHECK_TOLERANCE = {"fp32": 1e-5, "bf16": 2e-2}
NORMS = ("pre", "post", "hybrid", "hybrid_star")


def presets():
    """Names of the model presets (:data:`fastlayers.models.PRESETS`)."""
    return sorted(models.PRESETS)


def build_model(preset, seq_len=None, **overrides):
    """``fastlayers.models.build(preset, **overrides)``; ``max_seq_len`` raised to ``seq_len`` when shorter."""
    if preset not in models.PRESETS:
        raise ValueError(f"unknown preset {preset!r}; expected one of {', '.join(presets())}")
    if seq_len is not None and models.PRESETS[preset].get("max_seq_len", 0) < seq_len:
        overrides["max_seq_len"] = seq_len
    return models.build(preset, **overrides)


def embedding_params(model):
    """The embedding parameters: every ``nn.Embedding`` weight and an untied ``lm_head`` weight."""
    out = {id(m.weight): m.weight for m in model.modules() if isinstance(m, nn.Embedding)}
    head = getattr(model, "lm_head", None)
    if isinstance(head, nn.Linear):
        out[id(head.weight)] = head.weight
    return out


def count_params(model):
    """``(total, non_embedding)`` parameter counts (shared tensors counted once)."""
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    emb = sum(p.numel() for p in embedding_params(model).values())
    return total, total - emb


def param_groups(model, weight_decay):
    """AdamW groups: decay on 2+-dim weights except ``nn.Embedding`` ones (an untied LM head decays); none on
    embeddings, gains, biases, other 1-D parameters."""
    emb = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay, seen = [], [], set()
    for p in model.parameters():
        if id(p) in seen or not p.requires_grad:
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 and id(p) not in emb else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_at(step, lr, warmup, total, min_ratio):
    """Learning rate of step ``step`` (1-based): linear warm-up, then cosine to ``min_ratio * lr``."""
    if step <= warmup:
        return lr * step / warmup
    t = (step - warmup) / max(1, total - warmup)
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


@dataclass
class Config:
    preset: str = "hybridnorm-tiny"
    steps: int = 200
    batch: int = 8
    seq_len: int = 128
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup: int = -1  # -1: steps // 10
    weight_decay: float = 0.1
    clip: float = 1.0
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"
    backend: str = ""
    norm: str = ""
    model_args: dict = field(default_factory=dict)
    eval_every: int = -1  # -1: steps // 4
    eval_batches: int = 4
    data_bytes: int = 0
    compile: bool = False
    fsdp: bool = False
    timing_warmup: int = -1  # -1: min(5, max(1, steps // 10)), at most steps - 1

    def resolved(self):
        c = Config(**asdict(self))
        if c.device == "auto":
            c.device = "cuda" if torch.cuda.is_available() else "cpu"
        if c.dtype == "auto":
            c.dtype = "bf16" if c.device.startswith("cuda") else "fp32"
        if c.warmup < 0:
            c.warmup = max(1, c.steps // 10)
        if c.eval_every < 0:
            c.eval_every = max(1, c.steps // 4)
        if c.timing_warmup < 0:
            c.timing_warmup = min(5, max(1, c.steps // 10))
        c.timing_warmup = max(0, min(c.timing_warmup, c.steps - 1))
        return c


@dataclass
class Result:
    losses: list = field(default_factory=list)      # training loss of steps 1..steps (global mean)
    evals: list = field(default_factory=list)       # (step, validation loss)
    step_seconds: list = field(default_factory=list)  # wall time of each step of this run (eval excluded)
    summary: dict = field(default_factory=dict)


class Dist:
    """The process group, when launched by torchrun with WORLD_SIZE > 1."""

    def __init__(self):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.active = self.world > 1

    def init(self, device):
        if self.active and not torch.distributed.is_initialized():
            torch.distributed.init_process_group("nccl" if device.startswith("cuda") else "gloo")

    def mean(self, x):
        """The mean of a float over ranks."""
        if not self.active:
            return x
        t = torch.tensor([x], dtype=torch.float64)
        torch.distributed.all_reduce(t)
        return float(t) / self.world


def _device(cfg, dist):
    if cfg.device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise SystemExit("error: --device cuda: torch sees no CUDA device")
        if dist.active:
            torch.cuda.set_device(dist.local_rank)
            return f"cuda:{dist.local_rank}"
    return cfg.device


def _overrides(cfg):
    return {**cfg.model_args, **({"norm": cfg.norm} if cfg.norm else {})}


def _model_arg(text):
    """``KEY=VALUE`` of ``--model-arg``: the value parsed as JSON (numbers, true/false, lists), else a string."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    k, v = text.split("=", 1)
    try:
        v = json.loads(v)
    except ValueError:
        pass
    return k.strip(), v


_CORPUS = {}


def corpus(data_bytes=0):
    """The byte corpus (read once per process)."""
    key = data_bytes or None
    if key not in _CORPUS:
        _CORPUS[key] = _data.ByteCorpus(max_bytes=key)
    return _CORPUS[key]


class Progress:
    """A one-line progress report on stderr: ``\\r`` updates on a terminal, a line every few steps otherwise."""

    def __init__(self, total, label="", enabled=True):
        self.total, self.label, self.enabled = total, label, enabled
        self.tty = sys.stderr.isatty()
        self.every = max(1, total // 10)
        self.t0 = time.perf_counter()

    def update(self, step, loss, tokens_per_s, start_step=0):
        if not self.enabled or not (self.tty or step % self.every == 0 or step == self.total):
            return
        el = time.perf_counter() - self.t0
        done = step - start_step
        eta = el / done * (self.total - step) if done else 0.0
        line = (f"{self.label}step {step}/{self.total} | loss {loss:.4f} | {tokens_per_s:,.0f} tok/s | "
                f"ETA {int(eta) // 60}:{int(eta) % 60:02d}")
        sys.stderr.write(("\r" + line + "\x1b[K") if self.tty else line + "\n")
        if self.tty and step == self.total:
            sys.stderr.write("\n")
        sys.stderr.flush()


# ----------------------------------------------------------------------------------------- checkpoints
def _ckpt_dir(root, step):
    return os.path.join(root, f"step-{step:06d}")


def save_checkpoint(root, step, model, opt, cfg, result):
    from safetensors.torch import save_file
    tensors = {f"model.{k}": v.detach().to("cpu").clone().contiguous() for k, v in model.state_dict().items()}
    sd = opt.state_dict()
    for idx, st in sd["state"].items():
        for k, v in st.items():
            tensors[f"optim.{idx}.{k}"] = (v if torch.is_tensor(v) else torch.tensor(v)).detach().to("cpu").clone()
    tensors["rng.torch"] = torch.get_rng_state()
    groups = [{k: v for k, v in g.items() if k != "params"} | {"params": g["params"]} for g in sd["param_groups"]]
    meta = {"step": str(step), "config": json.dumps(asdict(cfg)), "param_groups": json.dumps(groups),
            "losses": json.dumps(result.losses[:step]), "evals": json.dumps([e for e in result.evals if e[0] <= step])}
    d = _ckpt_dir(root, step)
    os.makedirs(d, exist_ok=True)
    tmp = os.path.join(d, "checkpoint.safetensors.tmp")
    save_file(tensors, tmp, metadata=meta)
    os.replace(tmp, os.path.join(d, "checkpoint.safetensors"))
    return d


def find_checkpoint(path):
    """The checkpoint file of ``path``: a checkpoint directory, or a ``--save`` directory (its latest step)."""
    f = os.path.join(path, "checkpoint.safetensors")
    if os.path.isfile(f):
        return f
    steps = sorted(d for d in os.listdir(path) if d.startswith("step-")) if os.path.isdir(path) else []
    for d in reversed(steps):
        f = os.path.join(path, d, "checkpoint.safetensors")
        if os.path.isfile(f):
            return f
    raise SystemExit(f"error: --resume {path}: no checkpoint.safetensors there (nor in a step-* subdirectory)")


def load_checkpoint(path):
    from safetensors import safe_open
    f = find_checkpoint(path)
    with safe_open(f, "pt") as h:
        meta = h.metadata()
        tensors = {k: h.get_tensor(k) for k in h.keys()}
    return f, meta, tensors


_RESUME_KEYS = ("preset", "steps", "batch", "seq_len", "lr", "min_lr_ratio", "warmup", "weight_decay", "clip", "seed",
                "norm", "model_args", "data_bytes")


def _restore(meta, tensors, cfg, model, opt, result):
    saved = Config(**json.loads(meta["config"]))
    diff = [f"--{k.replace('_', '-')} {getattr(saved, k)!r} (checkpoint) vs {getattr(cfg, k)!r}"
            for k in _RESUME_KEYS if getattr(saved, k) != getattr(cfg, k)]
    if diff:
        raise SystemExit("error: --resume: the run's settings differ from the checkpoint's: " + "; ".join(diff))
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    state = {}
    for k, v in tensors.items():
        if k.startswith("optim."):
            _, idx, name = k.split(".", 2)
            state.setdefault(int(idx), {})[name] = v
    opt.load_state_dict({"state": state, "param_groups": json.loads(meta["param_groups"])})
    torch.set_rng_state(tensors["rng.torch"])
    result.losses = json.loads(meta["losses"])
    result.evals = [tuple(e) for e in json.loads(meta["evals"])]
    return int(meta["step"])


# ----------------------------------------------------------------------------------------- the loop
@torch.no_grad()
def evaluate(model, cfg, dist, device, autocast):
    was = model.training
    model.eval()
    data = corpus(cfg.data_bytes).val
    total = 0.0
    batches = _data.val_batches(data, cfg.eval_batches, cfg.batch, cfg.seq_len, dist.rank, dist.world)
    for x, y in batches:
        with autocast():
            _, loss = model(x.to(device), labels=y.to(device))
        total += float(loss)
    model.train(was)
    return dist.mean(total / len(batches))


def train(cfg, backend=None, save=None, save_every=0, resume=None, progress=True, label="", dist=None):
    """Train ``cfg`` (a :class:`Config`); ``backend`` forces every op onto one backend. Returns a :class:`Result`."""
    cfg = cfg.resolved()
    dist = dist or Dist()
    device = _device(cfg, dist)
    dist.init(device)
    backend = backend or cfg.backend or None
    train_data = corpus(cfg.data_bytes).train
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.preset, cfg.seq_len, **_overrides(cfg)).to(device)
    total_params, n_params = count_params(model)
    net = model
    if dist.active:
        if cfg.fsdp:
            from torch.distributed.fsdp import fully_shard
            for blk in getattr(model, "blocks", []):
                fully_shard(blk)
            fully_shard(model)
        else:
            net = nn.parallel.DistributedDataParallel(model, device_ids=[dist.local_rank] if device.startswith("cuda")
                                                      else None)
    if cfg.compile:
        net = torch.compile(net)
    opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8,
                            foreach=not cfg.fsdp)
    result = Result()
    start = 0
    if resume:
        _, meta, tensors = load_checkpoint(resume)
        start = _restore(meta, tensors, cfg, model, opt, result)

    def autocast():
        if cfg.dtype == "bf16":
            return torch.autocast(device.split(":")[0], dtype=torch.bfloat16)
        return torch.autocast(device.split(":")[0], enabled=False)

    tokens_per_step = cfg.batch * cfg.seq_len
    bar = Progress(cfg.steps, label, progress and dist.rank == 0)
    train_time, eval_time = 0.0, 0.0
    ctx = use_backend(backend) if backend else _null()
    with ctx:
        model.train()
        for step in range(start + 1, cfg.steps + 1):
            t0 = time.perf_counter()
            for g in opt.param_groups:
                g["lr"] = lr_at(step, cfg.lr, cfg.warmup, cfg.steps, cfg.min_lr_ratio)
            x, y = _data.train_batch(train_data, step, cfg.batch, cfg.seq_len, cfg.seed, dist.rank, dist.world)
            with autocast():
                _, loss = net(x.to(device), labels=y.to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.clip > 0:
                nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
            opt.step()
            lv = dist.mean(float(loss.detach()))
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            train_time += dt
            result.step_seconds.append(dt)
            result.losses.append(lv)
            if not math.isfinite(lv):
                raise FloatingPointError(f"training loss is {lv} at step {step}")
            bar.update(step, lv, (step - start) * tokens_per_step / max(train_time, 1e-9), start)
            if step % cfg.eval_every == 0 or step == cfg.steps:
                t1 = time.perf_counter()
                result.evals.append((step, evaluate(model, cfg, dist, device, autocast)))
                eval_time += time.perf_counter() - t1
            if save and dist.rank == 0 and ((save_every and step % save_every == 0) or step == cfg.steps):
                save_checkpoint(save, step, model, opt, cfg, result)
    done = cfg.steps - start
    # Steady state: the steps after this run's first ``timing_warmup`` (Triton compiles, autotuning,
    # torch.compile and allocator warm-up land there); their time is reported apart.
    k = min(cfg.timing_warmup, max(0, done - 1))
    warm_time, steady_time = sum(result.step_seconds[:k]), sum(result.step_seconds[k:])
    tokens = cfg.steps * tokens_per_step
    flops = scaling.flops(n_params, tokens) if tokens else 0.0
    run_flops = 6.0 * n_params * done * tokens_per_step
    result.summary = dict(
        preset=cfg.preset, model=type(model).__name__ + (f", norm {model.norm_placement}" if hasattr(model, "norm_placement") else ""), backend=backend or "default",
        device=device, dtype=cfg.dtype, world_size=dist.world, steps=cfg.steps,
        train_loss=result.losses[-1] if result.losses else float("nan"),
        val_loss=result.evals[-1][1] if result.evals else float("nan"),
        tokens=tokens, params=total_params, non_embedding_params=n_params, flops=flops,
        train_seconds=train_time, eval_seconds=eval_time,
        tokens_per_s=done * tokens_per_step / train_time if train_time else 0.0,
        flops_per_s=run_flops / train_time if train_time else 0.0,
        warmup_steps=k, warmup_seconds=warm_time, steady_seconds=steady_time,
        steady_tokens_per_s=(done - k) * tokens_per_step / steady_time if steady_time else 0.0,
        steady_flops_per_s=6.0 * n_params * (done - k) * tokens_per_step / steady_time if steady_time else 0.0)
    return result


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def format_summary(s):
    return (f"{s['preset']} ({s['model']}, backend {s['backend']}, {s['device']} {s['dtype']}, world {s['world_size']}): "
            f"{s['steps']} steps\n"
            f"  train loss {s['train_loss']:.4f} | val loss {s['val_loss']:.4f} (nats/byte)\n"
            f"  tokens D {s['tokens']:,} | non-embedding params N {s['non_embedding_params']:,} "
            f"(total {s['params']:,}) | FLOPs 6ND {s['flops']:.3e}\n"
            f"  {s['tokens_per_s']:,.0f} tokens/s | {s['flops_per_s'] / 1e9:.3f} GFLOP/s achieved (6N per token) | "
            f"train {s['train_seconds']:.1f} s, eval {s['eval_seconds']:.1f} s\n"
            f"  steady state (steps after the first {s['warmup_steps']}): {s['steady_tokens_per_s']:,.0f} tokens/s, "
            f"{s['steady_flops_per_s'] / 1e9:.3f} GFLOP/s | warm-up {s['warmup_seconds']:.2f} s")


# ----------------------------------------------------------------------------------------- check-reference
def compare_curves(fast, ref, tol):
    """``(ok, report lines, max relative difference)`` for two loss curves: ``|a - b| <= tol * |b|`` each step."""
    lines = [f"{'step':>6} {'fastlayers':>12} {'reference':>12} {'|diff|':>10} {'rel':>10}  "]
    ok, worst = len(fast) == len(ref), 0.0
    for i, (a, b) in enumerate(zip(fast, ref), 1):
        d = abs(a - b)
        rel = d / max(abs(b), 1e-30)
        good = d <= tol * abs(b)  # NaN compares False: a NaN loss fails
        worst = max(worst, rel) if math.isfinite(rel) else float("inf")
        ok = ok and good
        lines.append(f"{i:>6} {a:>12.6f} {b:>12.6f} {d:>10.2e} {rel:>10.2e}  {'ok' if good else 'FAIL'}")
    return ok, lines, worst


def check_reference(cfg, steps, tol=None, progress=True, out=print):
    """Train ``steps`` steps on the default backends and on ``reference``; return ``(ok, fast, ref)`` results."""
    c = Config(**{**asdict(cfg), "steps": steps})
    rc = c.resolved()
    tol = CHECK_TOLERANCE[rc.dtype] if tol is None else tol
    fast = train(c, progress=progress, label="[fastlayers] ")
    ref = train(c, backend="reference", progress=progress, label="[reference] ")
    ok, lines, worst = compare_curves(fast.losses, ref.losses, tol)
    vf, vr = fast.evals[-1][1], ref.evals[-1][1]
    vok = abs(vf - vr) <= tol * abs(vr)
    rank0 = Dist().rank == 0
    if rank0:
        if not (ok and vok):
            out("\n".join(lines))
        out(f"check-reference: {steps} steps, tolerance |loss - loss_ref| <= {tol:g} * loss_ref; "
            f"max relative difference {worst:.2e} (train), {abs(vf - vr) / abs(vr):.2e} (final val "
            f"{vf:.6f} vs {vr:.6f}): {'PASS' if ok and vok else 'FAIL'}")
        fs, rs = fast.summary, ref.summary
        out(f"  speed: fastlayers {fs['tokens_per_s']:,.0f} tokens/s, reference {rs['tokens_per_s']:,.0f} tokens/s; "
            f"steady state (after {fs['warmup_steps']} warm-up steps): fastlayers {fs['steady_tokens_per_s']:,.0f}, "
            f"reference {rs['steady_tokens_per_s']:,.0f} tokens/s; warm-up fastlayers {fs['warmup_seconds']:.2f} s, "
            f"reference {rs['warmup_seconds']:.2f} s")
    return ok and vok, fast, ref


# ----------------------------------------------------------------------------------------- compare-norms
def compare_norms(cfg, out_dir, progress=True, out=print):
    """Train the four norm placements on one budget/seed/data; write ``norms.csv`` and ``norms.png``."""
    os.makedirs(out_dir, exist_ok=True)
    results = {}
    for v in NORMS:
        results[v] = train(Config(**{**asdict(cfg), "norm": v}), progress=progress, label=f"[{v}] ")
    if Dist().rank != 0:
        return results
    path = os.path.join(out_dir, "norms.csv")
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", "variant", "train_loss", "val_loss"])
        for v, r in results.items():
            ev = dict(r.evals)
            for i, lv in enumerate(r.losses, 1):
                w.writerow([i, v, f"{lv:.6f}", f"{ev[i]:.6f}" if i in ev else ""])
    png = os.path.join(out_dir, "norms.png")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    for v, r in results.items():
        a1.plot(range(1, len(r.losses) + 1), r.losses, label=v, lw=1)
        a2.plot([e[0] for e in r.evals], [e[1] for e in r.evals], marker="o", label=v)
    a1.set(title="training loss", xlabel="step", ylabel="nats / byte")
    a2.set(title="validation loss", xlabel="step", ylabel="nats / byte")
    a1.legend(), a2.legend()
    fig.suptitle(f"{cfg.preset}: norm placement ({cfg.steps} steps, batch {cfg.batch} x {cfg.seq_len}, seed {cfg.seed})")
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    out("compare-norms: final validation loss (nats/byte)")
    for v, r in sorted(results.items(), key=lambda kv: kv[1].evals[-1][1]):
        out(f"  {v:12s} {r.evals[-1][1]:.4f}   (train {r.losses[-1]:.4f})")
    out(f"  wrote {path} and {png}")
    return results


# ----------------------------------------------------------------------------------------- CLI
def parser():
    p = argparse.ArgumentParser(prog="python -m fastlayers.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    d = Config()
    p.add_argument("--preset", default=d.preset, help=f"model preset (default {d.preset}); one of: {', '.join(presets())}")
    p.add_argument("--steps", type=int, default=d.steps, help="optimizer steps (default %(default)s)")
    p.add_argument("--batch", type=int, default=d.batch, help="global batch, sequences per step (default %(default)s)")
    p.add_argument("--seq-len", type=int, default=d.seq_len, help="tokens (bytes) per sequence (default %(default)s)")
    p.add_argument("--lr", type=float, default=d.lr, help="peak learning rate (default %(default)s)")
    p.add_argument("--min-lr-ratio", type=float, default=d.min_lr_ratio, help="final lr / peak lr (default %(default)s)")
    p.add_argument("--warmup", type=int, default=d.warmup, help="warm-up steps (default: steps // 10)")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay, help="AdamW decay of weight matrices (default %(default)s)")
    p.add_argument("--clip", type=float, default=d.clip, help="gradient-norm clip, 0 = off (default %(default)s)")
    p.add_argument("--seed", type=int, default=d.seed, help="initialisation and data seed (default %(default)s)")
    p.add_argument("--device", default=d.device, help="auto (cuda when available), cpu, cuda")
    p.add_argument("--dtype", default=d.dtype, choices=["auto", "fp32", "bf16"], help="auto: bf16 autocast on CUDA, fp32 on CPU")
    p.add_argument("--backend", default="", choices=["", "reference", "cpu", "triton", "cuda"],
                   help="run every op on this fastlayers backend (default: the per-device default)")
    p.add_argument("--norm", default="", choices=["", *NORMS], help="override the preset's norm placement (HybridNorm presets)")
    p.add_argument("--model-arg", action="append", default=[], type=_model_arg, metavar="KEY=VALUE",
                   help="override a preset's model argument (repeatable), e.g. --model-arg n_layers=2")
    p.add_argument("--eval-every", type=int, default=d.eval_every, help="validation every K steps and at the end (default: steps // 4)")
    p.add_argument("--eval-batches", type=int, default=d.eval_batches, help="validation batches (default %(default)s)")
    p.add_argument("--data-bytes", type=int, default=0, help="use at most this many bytes of each split (0: all)")
    p.add_argument("--budget", choices=["chinchilla"], help="chinchilla: steps so that tokens = 20 x non-embedding params")
    p.add_argument("--check-reference", type=int, default=0, metavar="N",
                   help="train N steps on the fastlayers kernels and on the reference backend; fail if the losses differ")
    p.add_argument("--tolerance", type=float, default=None,
                   help=f"--check-reference relative tolerance (default {CHECK_TOLERANCE['fp32']:g} fp32, "
                        f"{CHECK_TOLERANCE['bf16']:g} bf16)")
    p.add_argument("--compare-norms", action="store_true", help="train pre, post, hybrid, hybrid_star; write CSV + PNG")
    p.add_argument("--out", default="runs/compare-norms", help="output directory of --compare-norms (default %(default)s)")
    p.add_argument("--save", metavar="DIR", help="write checkpoints under DIR")
    p.add_argument("--save-every", type=int, default=0, metavar="K", help="checkpoint every K steps (and at the end)")
    p.add_argument("--resume", metavar="DIR", help="continue from a checkpoint (directory, or a --save directory: latest)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--timing-warmup", type=int, default=d.timing_warmup, metavar="K",
                   help="steps left out of the steady-state tokens/s (default: min(5, max(1, steps // 10)))")
    p.add_argument("--fsdp", action="store_true", help="shard with FSDP2 (fully_shard) instead of DDP under torchrun")
    p.add_argument("--json", metavar="FILE", help="write the per-step losses, evals and summary as JSON")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    return p


def _validate(p, a):
    if a.preset not in presets():
        p.error(f"--preset: unknown preset {a.preset!r}; expected one of {', '.join(presets())}")
    for name in ("steps", "batch", "seq_len", "eval_batches"):
        if getattr(a, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be a positive integer; got {getattr(a, name)}")
    for name in ("lr",):
        if not a.lr > 0 or not math.isfinite(a.lr):
            p.error(f"--lr must be a positive number; got {a.lr}")
    if a.timing_warmup < -1:
        p.error(f"--timing-warmup must be a number of steps (>= 0); got {a.timing_warmup}")
    if a.check_reference < 0:
        p.error(f"--check-reference must be a positive number of steps; got {a.check_reference}")
    if not 0 <= a.min_lr_ratio <= 1:
        p.error(f"--min-lr-ratio must be in [0, 1]; got {a.min_lr_ratio}")
    if a.clip < 0 or a.weight_decay < 0 or a.save_every < 0 or a.data_bytes < 0 or a.threads < 0:
        p.error("--clip, --weight-decay, --save-every, --data-bytes and --threads must not be negative")
    if a.tolerance is not None and not a.tolerance > 0:
        p.error(f"--tolerance must be positive; got {a.tolerance}")
    if a.device not in ("auto", "cpu") and not a.device.startswith("cuda"):
        p.error(f"--device must be auto, cpu or cuda[:N]; got {a.device!r}")
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device {a.device}: torch sees no CUDA device on this machine")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if a.batch % world:
        p.error(f"--batch {a.batch} must be divisible by the number of processes ({world})")
    if a.compare_norms and a.norm:
        p.error("--compare-norms trains every norm placement: drop --norm")
    if (a.compare_norms or a.norm) and models.PRESETS[a.preset].get("kind") != "hybridnorm":
        p.error(f"--compare-norms and --norm need a HybridNorm preset; got {a.preset!r}")
    if a.fsdp and world == 1:
        p.error("--fsdp shards over processes: launch with torchrun --nproc_per_node=N (N >= 2)")
    if a.fsdp and (a.save or a.resume):
        p.error("--fsdp: checkpoints of sharded runs (--save/--resume) are not supported yet; use DDP")
    if a.model_arg:
        try:
            build_model(a.preset, a.seq_len, device="meta", **dict(a.model_arg))
        except (TypeError, ValueError) as e:
            p.error(f"--model-arg: {e}")
    if a.resume and (a.check_reference or a.compare_norms):
        p.error("--resume continues one run; it does not combine with --check-reference or --compare-norms")


def main(argv=None):
    p = parser()
    a = p.parse_args(argv)
    _validate(p, a)
    threads = torch.get_num_threads()
    if a.threads:
        torch.set_num_threads(a.threads)
    try:
        return _main(p, a)
    finally:
        torch.set_num_threads(threads)


def _main(p, a):
    cfg = Config(preset=a.preset, steps=a.steps, batch=a.batch, seq_len=a.seq_len, lr=a.lr, min_lr_ratio=a.min_lr_ratio,
                 warmup=a.warmup, weight_decay=a.weight_decay, clip=a.clip, seed=a.seed, device=a.device, dtype=a.dtype,
                 backend=a.backend, norm=a.norm, model_args=dict(a.model_arg), eval_every=a.eval_every, eval_batches=a.eval_batches,
                 data_bytes=a.data_bytes, compile=a.compile, fsdp=a.fsdp, timing_warmup=a.timing_warmup)
    try:
        corpus_ = corpus(a.data_bytes)
        _data._check(corpus_.train, a.seq_len, "training")
        _data._check(corpus_.val, a.seq_len, "validation")
    except ValueError as e:
        p.error(f"--seq-len {a.seq_len} / --data-bytes {a.data_bytes}: {e}")
    rank0 = Dist().rank == 0
    say = print if rank0 else (lambda *x, **k: None)
    if a.budget == "chinchilla":
        _, n = count_params(build_model(a.preset, a.seq_len, **_overrides(cfg)))
        want = scaling.chinchilla_tokens(n)
        cfg.steps = max(1, math.ceil(want / (a.batch * a.seq_len)))
        say(f"budget chinchilla: N = {n:,} non-embedding parameters -> D = 20 N = {want:,.0f} tokens = "
            f"{cfg.steps} steps of {a.batch} x {a.seq_len} (C = 6ND = {scaling.flops(n, want):.3e} FLOPs)")
    say(f"data: {corpus_}")
    status = 0
    if a.compare_norms:
        compare_norms(cfg, a.out, progress=not a.quiet, out=say)
    elif a.check_reference:
        ok, fast, ref = check_reference(cfg, a.check_reference, a.tolerance, progress=not a.quiet, out=say)
        say(format_summary(fast.summary))
        status = 0 if ok else 1
        _write_json(a.json, {"fast": fast, "reference": ref, "ok": ok}, rank0)
    else:
        r = train(cfg, save=a.save, save_every=a.save_every, resume=a.resume, progress=not a.quiet)
        say(format_summary(r.summary))
        _write_json(a.json, {"run": r}, rank0)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return status


def _write_json(path, obj, rank0):
    if not path or not rank0:
        return
    conv = {k: (asdict(v) if isinstance(v, Result) else v) for k, v in obj.items()}
    with open(path, "w") as f:
        json.dump(conv, f, indent=1)


def cli():
    """Console entry point (``fastlayers-train``)."""
    sys.exit(main())


if __name__ == "__main__":
    cli()
