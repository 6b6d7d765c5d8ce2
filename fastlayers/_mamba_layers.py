"""Parameters, validation, initialisation and the inference cache of the Mamba layers.

The fast modules (:mod:`fastlayers.mamba`) and the pure-PyTorch reference modules
(:mod:`fastlayers.reference`) subclass these bases and write their own ``forward``: one set of
parameter names (mamba_ssm's, so a mamba_ssm state_dict loads), two independent implementations.

Mamba (mamba_ssm ``Mamba``): ``in_proj`` -> [x, z] (2 d_inner), depthwise causal ``conv1d`` on
x, ``x_proj`` -> [dt (dt_rank), B (d_state), C (d_state)], ``dt_proj`` (dt_rank -> d_inner, with
bias), ``A_log`` ``(d_inner, d_state)``, ``D`` ``(d_inner,)``, ``out_proj``.

Mamba2 (mamba_ssm ``Mamba2``, no d_ssm / MLP part): ``in_proj`` -> [z (d_inner), x (d_inner),
B (ngroups d_state), C (ngroups d_state), dt (nheads)], ``conv1d`` over [x, B, C], ``dt_bias``,
``A_log``, ``D`` ``(nheads,)``, gated RMSNorm ``norm`` (weight ``(d_inner,)``, groups of
d_inner / ngroups channels), ``out_proj``. With ``d_xb`` (Zebra-Llama / MambaInLlama): in_proj ->
[z (d_inner), x (d_xb), B (d_xb), C (d_inner), dt (nheads)], the conv runs over [x, B, C] before
x and B are repeated from d_xb / headdim KV groups to nheads (= ngroups, headdim = d_state).
"""
import math

import torch
from torch import nn

from ._dtypes import stat_dtype
from ._layers import Gain, _positive_int

NORM_EPS = 1e-5  # mamba_ssm's RMSNormGated default


class MambaCache:
    """The recurrent state of one Mamba / Mamba2 layer for ``batch`` sequences.

    ``conv_state`` ``(batch, conv_channels, d_conv)``: the last d_conv inputs of the conv (oldest
    first; mamba_ssm's and ``causal_conv1d_update``'s layout), in the activations' dtype.
    ``ssm_state``: fp32 (fp64 for a fp64 cache), ``(batch, d_inner, d_state)`` for Mamba,
    ``(batch, nheads, headdim, d_state)`` for Mamba2. ``seqlen``: tokens consumed so far.
    """

    def __init__(self, conv_state, ssm_state):
        self.conv_state, self.ssm_state, self.seqlen = conv_state, ssm_state, 0

    @property
    def batch(self):
        return self.conv_state.shape[0]

    def state_bytes(self):
        """Bytes held by the two states (constant in the sequence length)."""
        return sum(t.numel() * t.element_size() for t in (self.conv_state, self.ssm_state))

    def reset(self):
        """Back to the empty state (zeros), to start new sequences."""
        self.conv_state.zero_()
        self.ssm_state.zero_()
        self.seqlen = 0

    def __repr__(self):
        return (f"MambaCache(batch={self.batch}, conv_state={tuple(self.conv_state.shape)} {self.conv_state.dtype}, "
                f"ssm_state={tuple(self.ssm_state.shape)} {self.ssm_state.dtype}, seqlen={self.seqlen})")


def f32(t):
    """``t`` in fp32 (mamba_ssm's ``.float()`` of A_log, D, the dt bias), or kept in fp64 when it is fp64."""
    return t if t.dtype == torch.float64 else t.float()


def _inv_softplus_dt(n, dt_min, dt_max, floor=1e-4, device=None, dtype=None):
    """mamba_ssm's dt initialisation: dt log-uniform in [dt_min, dt_max] (floored), returned as the
    inverse softplus of dt (so that softplus(bias) = dt)."""
    dt = torch.exp(torch.rand(n, device=device, dtype=torch.float32) * (math.log(dt_max) - math.log(dt_min))
                   + math.log(dt_min)).clamp(min=floor)
    return (dt + torch.log(-torch.expm1(-dt))).to(dtype)


def _check_dt_range(cls, dt_min, dt_max):
    if not (isinstance(dt_min, (int, float)) and isinstance(dt_max, (int, float)) and 0 < dt_min <= dt_max):
        raise ValueError(f"{cls}: need 0 < dt_min <= dt_max; got dt_min={dt_min!r}, dt_max={dt_max!r}")


class _CacheMixin:
    """Cache creation and the argument checks of ``forward(x, cache=None)``."""

    def _conv_weight(self):
        return self.conv1d.weight[:, 0, :]  # (channels, d_conv): causal_conv1d's layout

    def new_cache(self, batch, dtype=None, device=None):
        """An empty :class:`MambaCache` for ``batch`` sequences; ``dtype``: the conv state's (the
        activations') dtype, default the parameters'. The SSM state is fp32 (fp64 for fp64)."""
        batch = _positive_int(type(self).__name__, "batch", batch)
        w = self.in_proj.weight
        dtype = dtype or w.dtype
        device = device or w.device
        conv = torch.zeros(batch, self.conv_channels, self.d_conv, dtype=dtype, device=device)
        ssm = torch.zeros((batch,) + self.ssm_state_shape, dtype=stat_dtype(dtype), device=device)
        return MambaCache(conv, ssm)

    def check_input(self, x, cache):
        cls = type(self).__name__
        if not isinstance(x, torch.Tensor) or not x.dtype.is_floating_point:
            raise TypeError(f"{cls}: x must be a floating tensor (batch, seqlen, d_model); got "
                            f"{getattr(x, 'dtype', type(x).__name__)}")
        if x.dim() != 3 or x.shape[2] != self.d_model or x.shape[1] == 0:
            raise ValueError(f"{cls}: x must have shape (batch, seqlen >= 1, {self.d_model}) (d_model = "
                             f"{self.d_model}); got {tuple(x.shape)}")
        if cache is None:
            return
        if not isinstance(cache, MambaCache):
            raise TypeError(f"{cls}: cache must be a MambaCache (from new_cache); got {type(cache).__name__}")
        want_conv = (x.shape[0], self.conv_channels, self.d_conv)
        want_ssm = (x.shape[0],) + self.ssm_state_shape
        if tuple(cache.conv_state.shape) != want_conv or tuple(cache.ssm_state.shape) != want_ssm:
            raise ValueError(f"{cls}: cache states {tuple(cache.conv_state.shape)}, {tuple(cache.ssm_state.shape)} "
                             f"do not fit x of batch {x.shape[0]}: expected {want_conv}, {want_ssm} "
                             f"(make it with new_cache({x.shape[0]}))")
        if cache.conv_state.device != x.device:
            raise ValueError(f"{cls}: cache is on {cache.conv_state.device} but x is on {x.device}")


def _set_sizes(layer, cls, d_model, d_state, d_conv, expand):
    """The sizes both blocks share, checked: d_model, d_state, d_conv (2-4, the conv kernels' widths), expand."""
    layer.d_model = _positive_int(cls, "d_model", d_model)
    layer.d_state = _positive_int(cls, "d_state", d_state)
    layer.d_conv = _positive_int(cls, "d_conv", d_conv)
    if not 2 <= d_conv <= 4:
        raise ValueError(f"{cls}: d_conv must be 2, 3 or 4 (the causal_conv1d kernels); got {d_conv}")
    layer.expand = _positive_int(cls, "expand", expand)


class MambaBase(_CacheMixin, nn.Module):
    """Mamba-1 block parameters (mamba_ssm names and shapes, see the module docstring)."""

    def __init__(self, d_model, d_state=16, d_conv=4, expand=2, dt_rank="auto", dt_min=0.001, dt_max=0.1,
                 conv_bias=True, bias=False, device=None, dtype=None):
        super().__init__()
        cls = type(self).__name__
        _set_sizes(self, cls, d_model, d_state, d_conv, expand)
        self.d_inner = expand * d_model
        if dt_rank == "auto":
            dt_rank = math.ceil(d_model / 16)
        self.dt_rank = _positive_int(cls, "dt_rank", dt_rank)
        _check_dt_range(cls, dt_min, dt_max)
        self.dt_min, self.dt_max = float(dt_min), float(dt_max)
        kw = dict(device=device, dtype=dtype)
        d = self.d_inner
        self.in_proj = nn.Linear(d_model, 2 * d, bias=bias, **kw)
        self.conv1d = nn.Conv1d(d, d, d_conv, groups=d, padding=d_conv - 1, bias=conv_bias, **kw)
        self.x_proj = nn.Linear(d, self.dt_rank + 2 * d_state, bias=False, **kw)
        self.dt_proj = nn.Linear(self.dt_rank, d, bias=True, **kw)
        # As mamba_ssm: A_log and D are fp32 whatever dtype is asked for (the model's .to() may change them).
        self.A_log = nn.Parameter(torch.empty(d, d_state, device=device, dtype=torch.float32))
        self.D = nn.Parameter(torch.empty(d, device=device, dtype=torch.float32))
        self.out_proj = nn.Linear(d, d_model, bias=bias, **kw)
        self.A_log._no_weight_decay = True
        self.D._no_weight_decay = True
        self.reset_parameters()

    @property
    def conv_channels(self):
        return self.d_inner

    @property
    def ssm_state_shape(self):
        return (self.d_inner, self.d_state)

    def reset_parameters(self):
        """mamba_ssm's initialisation: nn.Linear / nn.Conv1d defaults; dt_proj weight uniform +-dt_rank^-0.5,
        its bias the inverse softplus of dt log-uniform in [dt_min, dt_max]; A = 1..d_state per channel
        (S4D-real), A_log = log A; D = 1."""
        for m in (self.in_proj, self.conv1d, self.x_proj, self.out_proj):
            m.reset_parameters()
        std = self.dt_rank ** -0.5
        with torch.no_grad():
            nn.init.uniform_(self.dt_proj.weight, -std, std)
            self.dt_proj.bias.copy_(_inv_softplus_dt(self.d_inner, self.dt_min, self.dt_max,
                                                     device=self.dt_proj.bias.device))
            a = torch.arange(1, self.d_state + 1, dtype=torch.float32, device=self.A_log.device)
            self.A_log.copy_(torch.log(a).expand(self.d_inner, -1))
            self.D.fill_(1.0)

    def extra_repr(self):
        return (f"d_model={self.d_model}, d_inner={self.d_inner}, d_state={self.d_state}, d_conv={self.d_conv}, "
                f"dt_rank={self.dt_rank}")


class Mamba2Base(_CacheMixin, nn.Module):
    """Mamba-2 block parameters (mamba_ssm names and shapes; Zebra-Llama's variant with ``d_xb``)."""

    def __init__(self, d_model, d_state=128, d_conv=4, expand=2, headdim=64, ngroups=1, chunk_size=256, d_xb=None,
                 A_init_range=(1, 16), dt_min=0.001, dt_max=0.1, dt_limit=(0.0, float("inf")), conv_bias=True,
                 bias=False, norm_before_gate=False, device=None, dtype=None, *, d_inner=None):
        super().__init__()
        cls = type(self).__name__
        _set_sizes(self, cls, d_model, d_state, d_conv, expand)
        self.d_inner = expand * d_model if d_inner is None else _positive_int(cls, "d_inner", d_inner)
        self.headdim = _positive_int(cls, "headdim", headdim)
        self.ngroups = _positive_int(cls, "ngroups", ngroups)
        self.chunk_size = _positive_int(cls, "chunk_size", chunk_size)
        if self.d_inner % headdim:
            raise ValueError(f"{cls}: d_inner = {'d_model * expand' if d_inner is None else 'd_inner'} = "
                             f"{self.d_inner} is not divisible by headdim ({headdim})")
        self.nheads = self.d_inner // headdim
        if self.nheads % ngroups:
            raise ValueError(f"{cls}: ngroups ({ngroups}) must divide nheads = d_inner / headdim = {self.nheads}")
        if norm_before_gate:
            raise NotImplementedError(f"{cls}: norm_before_gate=True is not implemented (only mamba_ssm's default, "
                                      f"norm(y * silu(z)))")
        self.norm_before_gate = False
        if not (isinstance(A_init_range, (tuple, list)) and len(A_init_range) == 2
                and 0 < A_init_range[0] <= A_init_range[1]):
            raise ValueError(f"{cls}: A_init_range must be (lo, hi) with 0 < lo <= hi; got {A_init_range!r}")
        self.A_init_range = tuple(float(a) for a in A_init_range)
        _check_dt_range(cls, dt_min, dt_max)
        self.dt_min, self.dt_max = float(dt_min), float(dt_max)
        if not (isinstance(dt_limit, (tuple, list)) and len(dt_limit) == 2 and 0 <= dt_limit[0] <= dt_limit[1]):
            raise ValueError(f"{cls}: dt_limit must be (lo, hi) with 0 <= lo <= hi; got {dt_limit!r}")
        self.dt_limit = (float(dt_limit[0]), float(dt_limit[1]))
        self.d_xb = d_xb
        if d_xb is not None:
            d_xb = _positive_int(cls, "d_xb", d_xb)
            if headdim != d_state:
                raise ValueError(f"{cls}: with d_xb (Zebra-Llama's variant) headdim must equal d_state; got "
                                 f"headdim {headdim}, d_state {d_state}")
            if ngroups != self.nheads:
                raise ValueError(f"{cls}: with d_xb, ngroups must equal nheads = d_inner / headdim = {self.nheads} "
                                 f"(one C per head); got ngroups {ngroups}")
            if d_xb % headdim:
                raise ValueError(f"{cls}: d_xb ({d_xb}) must be a multiple of head_dim = headdim = {headdim} "
                                 f"(n_kv_heads * head_dim)")
            n_kv = d_xb // headdim
            if self.nheads % n_kv:
                raise ValueError(f"{cls}: d_xb / headdim = {n_kv} KV groups must divide nheads ({self.nheads})")
            self.n_kv_groups = n_kv
            self.conv_dim = 2 * d_xb + self.d_inner
        else:
            self.n_kv_groups = None
            self.conv_dim = self.d_inner + 2 * ngroups * d_state
        kw = dict(device=device, dtype=dtype)
        self.in_proj = nn.Linear(d_model, self.d_inner + self.conv_dim + self.nheads, bias=bias, **kw)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, d_conv, groups=self.conv_dim, padding=d_conv - 1,
                                bias=conv_bias, **kw)
        self.dt_bias = nn.Parameter(torch.empty(self.nheads, **kw))
        self.A_log = nn.Parameter(torch.empty(self.nheads, **kw))
        self.D = nn.Parameter(torch.empty(self.nheads, device=device, dtype=torch.float32))  # fp32, as mamba_ssm
        self.norm = Gain(self.d_inner, **kw)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias, **kw)
        for p in (self.dt_bias, self.A_log, self.D):
            p._no_weight_decay = True
        self.reset_parameters()

    @classmethod
    def zebra(cls, d_model, n_heads, n_kv_heads, head_dim, d_conv=4, **kw):
        """Zebra-Llama's / MambaInLlama's Mamba-2 layer replacing an attention layer of ``n_heads`` query heads,
        ``n_kv_heads`` KV heads of ``head_dim``: expand 1 (d_inner = n_heads * head_dim), headdim = d_state =
        head_dim, ngroups = nheads = n_heads, d_xb = n_kv_heads * head_dim."""
        name = cls.__name__
        n_heads = _positive_int(name, "n_heads", n_heads)
        n_kv_heads = _positive_int(name, "n_kv_heads", n_kv_heads)
        head_dim = _positive_int(name, "head_dim", head_dim)
        if n_heads % n_kv_heads:
            raise ValueError(f"{name}.zebra: n_kv_heads ({n_kv_heads}) must divide n_heads ({n_heads})")
        for k in ("d_state", "expand", "headdim", "ngroups", "d_xb", "d_inner"):
            if k in kw:
                raise ValueError(f"{name}.zebra: {k} is set by the zebra layout; do not pass it")
        return cls(d_model, d_state=head_dim, d_conv=d_conv, expand=1, headdim=head_dim, ngroups=n_heads,
                   d_xb=n_kv_heads * head_dim, d_inner=n_heads * head_dim, **kw)

    @property
    def conv_channels(self):
        return self.conv_dim

    @property
    def ssm_state_shape(self):
        return (self.nheads, self.headdim, self.d_state)

    def split_sizes(self):
        """Channel counts of in_proj's output: [z, x, B, C, dt]."""
        if self.d_xb is not None:
            return [self.d_inner, self.d_xb, self.d_xb, self.d_inner, self.nheads]
        gn = self.ngroups * self.d_state
        return [self.d_inner, self.d_inner, gn, gn, self.nheads]

    def reset_parameters(self):
        """mamba_ssm's initialisation: nn.Linear / nn.Conv1d defaults; dt_bias the inverse softplus of dt
        log-uniform in [dt_min, dt_max]; A uniform in A_init_range, A_log = log A; D = 1; norm weight 1."""
        for m in (self.in_proj, self.conv1d, self.out_proj):
            m.reset_parameters()
        with torch.no_grad():
            self.dt_bias.copy_(_inv_softplus_dt(self.nheads, self.dt_min, self.dt_max, device=self.dt_bias.device))
            a = torch.empty(self.nheads, dtype=torch.float32, device=self.A_log.device).uniform_(*self.A_init_range)
            self.A_log.copy_(torch.log(a))
            self.D.fill_(1.0)
            self.norm.weight.fill_(1.0)

    def extra_repr(self):
        s = (f"d_model={self.d_model}, d_inner={self.d_inner}, d_state={self.d_state}, nheads={self.nheads}, "
             f"headdim={self.headdim}, ngroups={self.ngroups}, d_conv={self.d_conv}")
        return s + (f", d_xb={self.d_xb}" if self.d_xb is not None else "")
