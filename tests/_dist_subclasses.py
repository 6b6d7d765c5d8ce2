"""Run by tests/test_tensor_subclasses.py under torch.distributed.run (gloo, CPU; 1 or 2 processes):
the fastlayers ops with DTensor and other tensor-subclass arguments.

    python -m torch.distributed.run --standalone --nproc_per_node=N tests/_dist_subclasses.py BACKEND...

Any wrong result is an AssertionError (exit status 1); a kernel reading a subclass's data_ptr() would
crash the process (a signal), which the calling test reports too. Prints one line per check on rank 0.
"""
import sys

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.utils._pytree import tree_map

import fastlayers
from fastlayers import reference

RANK = 0


def say(*a):
    if RANK == 0:
        print(*a, flush=True)


def rel_err(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def expect_error(kind, name, fn, what):
    try:
        fn()
    except kind as e:
        assert name in str(e), f"{what}: the {kind.__name__} does not name {name!r}: {e}"
        say(f"ok   {what}: {kind.__name__}")
        return
    raise AssertionError(f"{what}: no {kind.__name__} raised")


class Wrapper(torch.Tensor):
    """A minimal wrapper subclass (``__torch_dispatch__``): its data_ptr() is not its data."""

    @staticmethod
    def __new__(cls, elem):
        return torch.Tensor._make_wrapper_subclass(cls, elem.shape, strides=elem.stride(), dtype=elem.dtype,
                                                   device=elem.device, requires_grad=elem.requires_grad)

    def __init__(self, elem):
        self.elem = elem

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        unwrap = lambda t: t.elem if isinstance(t, Wrapper) else t  # noqa: E731
        return func(*tree_map(unwrap, args), **tree_map(unwrap, kwargs or {}))


class Tagged(torch.Tensor):
    """A ``__torch_function__``-only subclass: its storage is its data, so the kernels may read it."""


def check_norms(mesh, backend):
    g = torch.Generator().manual_seed(0)  # the same full tensors on every rank
    ws = mesh.size()
    for is_rms in (True, False):
        for placements in ([Shard(0)], [Shard(1)], [Replicate()]):
            for weight_kind in ("dtensor", "plain"):
                xf = torch.randn(2 * ws, 3 * ws, 24, generator=g)
                rf = torch.randn(xf.shape, generator=g)
                wf = 1 + 0.5 * torch.randn(24, generator=g)
                bf = torch.randn(24, generator=g)
                dyf, dhf = torch.randn(xf.shape, generator=g), torch.randn(xf.shape, generator=g)
                x = distribute_tensor(xf, mesh, placements).requires_grad_()
                r = distribute_tensor(rf, mesh, placements).requires_grad_()
                if weight_kind == "dtensor":
                    w = distribute_tensor(wf, mesh, [Replicate()]).requires_grad_()
                    b = distribute_tensor(bf, mesh, [Replicate()]).requires_grad_()
                else:
                    w, b = wf.clone().requires_grad_(), bf.clone().requires_grad_()
                with fastlayers.use_backend(backend):
                    if is_rms:
                        y, h = fastlayers.rms_norm(x, w, 1e-6, residual=r, prenorm=True, offset=1.0)
                    else:
                        y, h = fastlayers.layer_norm(x, w, b, 1e-5, residual=r, prenorm=True)
                what = (f"{backend} {'rms' if is_rms else 'ln'}_norm x {placements}, weight {weight_kind}, "
                        f"{ws} rank(s)")
                for name, t in (("y", y), ("h", h)):
                    assert isinstance(t, DTensor) and tuple(t.placements) == tuple(placements), (what, name, t)
                    assert t.shape == xf.shape, (what, name)
                (y * distribute_tensor(dyf, mesh, placements)).sum().backward(retain_graph=True)
                (h * distribute_tensor(dhf, mesh, placements)).sum().backward()

                leaves = [t.double().requires_grad_() for t in (xf, rf, wf, bf)]
                if is_rms:
                    yr, hr = reference.rms_norm(leaves[0], leaves[2], 1e-6, residual=leaves[1], prenorm=True,
                                                offset=1.0)
                else:
                    yr, hr = reference.layer_norm(leaves[0], leaves[2], leaves[3], 1e-5, residual=leaves[1],
                                                  prenorm=True)
                ((yr * dyf.double()).sum() + (hr * dhf.double()).sum()).backward()
                full = lambda t: t.full_tensor() if isinstance(t, DTensor) else t  # noqa: E731
                assert rel_err(full(y), yr) < 1e-5 and rel_err(full(h), hr) < 1e-6, what
                grads = [("dx", x, leaves[0]), ("dresidual", r, leaves[1]), ("dweight", w, leaves[2])]
                if not is_rms:
                    grads.append(("dbias", b, leaves[3]))
                for name, t, tr in grads:
                    assert t.grad is not None, (what, name)
                    if isinstance(t, DTensor):
                        assert isinstance(t.grad, DTensor), (what, name)
                    err = rel_err(full(t.grad), tr.grad)
                    assert err < 1e-5, f"{what}: {name} relative error {err:.3g}"
                if is_rms:
                    assert b.grad is None, what
                say(f"ok   {what}")


def check_norm_errors(mesh):
    xf = torch.randn(4, 6, 8, generator=torch.Generator().manual_seed(2))  # the same on every rank
    w = distribute_tensor(torch.ones(8), mesh, [Replicate()])
    x = distribute_tensor(xf, mesh, [Shard(0)])
    expect_error(ValueError, "last", lambda: fastlayers.rms_norm(distribute_tensor(xf, mesh, [Shard(2)]), w),
                 "rms_norm of x sharded on the normalised dim")
    expect_error(ValueError, "weight", lambda: fastlayers.rms_norm(x, distribute_tensor(torch.ones(8), mesh,
                                                                                        [Shard(0)])),
                 "rms_norm with a sharded weight")
    expect_error(ValueError, "residual", lambda: fastlayers.rms_norm(x, w, residual=xf), "a plain residual")
    expect_error(TypeError, "weight", lambda: fastlayers.rms_norm(xf, w), "a DTensor weight with a plain x")
    expect_error(TypeError, "out", lambda: fastlayers.rms_norm(x, w, out=torch.empty(4, 6, 8)), "out= with a DTensor")
    m = fastlayers.RMSNorm(8)
    m.weight = torch.nn.Parameter(distribute_tensor(m.weight.detach(), mesh, [Replicate()]))
    expect_error(TypeError, "weight", lambda: m(xf), "RMSNorm module with a DTensor weight and a plain x")
    y = m(x)
    assert isinstance(y, DTensor) and rel_err(y.full_tensor(), reference.rms_norm(xf, torch.ones(8))) < 1e-6
    say("ok   RMSNorm module with a Replicate DTensor weight")


def other_op_cases(make):
    """(argument name, call) for every other op, with ``make(t)`` turning the named argument into a subclass."""
    g = torch.Generator().manual_seed(1)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    q, k = r(1, 3, 4, 8), r(1, 3, 2, 8)
    cos, sin = reference.rope_tables(8, 16, 10000.0, "cpu")
    u, delta, A, Bm = r(2, 4, 6), r(2, 4, 6).abs(), -r(4, 3).abs(), r(2, 3, 6)
    xs, dt, Ah, Bs = r(1, 16, 2, 4), r(1, 16, 2).abs(), -r(2).abs(), r(1, 16, 1, 3)
    kv = r(4, 16, 1, 12)
    table = torch.arange(4, dtype=torch.int32).view(1, 4)
    lens = torch.tensor([40], dtype=torch.int32)
    return [
        ("x", lambda: fastlayers.rms_norm(make(r(3, 8)), torch.ones(8))),
        ("weight", lambda: fastlayers.layer_norm(r(3, 8), make(torch.ones(8)))),
        ("residual", lambda: fastlayers.rms_norm(r(3, 8), torch.ones(8), residual=make(r(3, 8)))),
        ("gate", lambda: fastlayers.swiglu(make(r(3, 8)))),
        ("up", lambda: fastlayers.swiglu(r(3, 8), make(r(3, 8)))),
        ("x", lambda: fastlayers.causal_conv1d(make(r(2, 5, 7)), r(5, 4))),
        ("weight", lambda: fastlayers.causal_conv1d(r(2, 5, 7), make(r(5, 4)))),
        ("conv_state", lambda: fastlayers.causal_conv1d_update(r(2, 5), make(r(2, 5, 3)), r(5, 4))),
        ("q", lambda: fastlayers.qkv_norm_rope(make(q), k, k.clone(), None, None, None, cos, sin)),
        ("k_weight", lambda: fastlayers.qkv_norm_rope(q, k, k.clone(), None, make(torch.ones(8)), None, None,
                                                      None)),
        ("offset", lambda: fastlayers.qkv_norm_rope(q, k, k.clone(), None, None, None, cos, sin,
                                                    offset=make(torch.zeros(1, dtype=torch.int64)))),
        ("delta", lambda: fastlayers.selective_scan(u, make(delta), A, Bm, Bm)),
        ("x", lambda: fastlayers.ssd_scan(make(xs), dt, Ah, Bs, Bs, 16)),
        ("seq_idx", lambda: fastlayers.ssd_scan(xs, dt, Ah, Bs, Bs, 16,
                                                seq_idx=make(torch.zeros(1, 16, dtype=torch.int32)))),
        ("state", lambda: fastlayers.selective_state_update(make(r(2, 4, 3)), r(2, 4), r(2, 4), A, r(2, 3),
                                                            r(2, 3))),
        ("state_batch_indices", lambda: fastlayers.selective_state_update(
            r(2, 4, 3), r(2, 4), r(2, 4), A, r(2, 3), r(2, 3),
            state_batch_indices=make(torch.tensor([1, 0], dtype=torch.int32)))),
        ("q", lambda: fastlayers.mla_decode(make(r(1, 1, 2, 12)), kv, table, lens, 8)),
        ("block_table", lambda: fastlayers.mla_decode(r(1, 1, 2, 12), kv, make(table), lens, 8)),
        ("cache_seqlens", lambda: fastlayers.mla_decode(r(1, 1, 2, 12), kv, table, make(lens), 8)),
    ]


def check_other_ops(mesh, backend):
    """Every op refuses a DTensor (except the norms' x, which it handles) or a wrapper subclass, naming it."""
    dt = lambda t: distribute_tensor(t, mesh, [Replicate()])  # noqa: E731
    with fastlayers.use_backend(backend):
        for kind, make in (("DTensor", dt), ("wrapper subclass", Wrapper)):
            refused = 0
            for i, (name, call) in enumerate(other_op_cases(make)):
                if kind == "DTensor" and i == 0:
                    continue  # the norms take a DTensor x (check_norms)
                try:
                    call()
                except TypeError as e:
                    assert name in str(e) and kind.split()[0].lower() in str(e).lower(), \
                        f"{kind} {name}: the TypeError does not name it: {e}"
                    refused += 1
                    continue
                raise AssertionError(f"{backend}: a {kind} {name} was not refused")
            say(f"ok   {backend}: every op refuses a {kind}, naming the argument ({refused} cases)")
        # A __torch_function__-only subclass holds its data: it runs, and gives the plain tensor's result.
        x, w = torch.randn(3, 8), torch.rand(8) + 0.5
        y = fastlayers.rms_norm(x.as_subclass(Tagged), w)
        assert rel_err(y, reference.rms_norm(x, w)) < 1e-6, backend
        say(f"ok   {backend}: a __torch_function__ subclass runs")


def main():
    global RANK
    dist.init_process_group("gloo")
    RANK = dist.get_rank()
    torch.set_num_threads(1)
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for backend in sys.argv[1:]:
        check_norms(mesh, backend)
        check_other_ops(mesh, backend)
    check_norm_errors(mesh)
    dist.destroy_process_group()
    say("done")


if __name__ == "__main__":
    main()
