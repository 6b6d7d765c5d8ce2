"""The Mamba and Mamba-2 layers (mamba_ssm's ``Mamba`` / ``Mamba2``; Zebra-Llama's Mamba-2 variant)
on fastlayers' ops, with an inference cache.

``forward(x, cache=None)``, x ``(batch, T, d_model)``:

- no cache: the whole sequence (training / scoring): causal conv1d + the scan
  (``selective_scan`` for Mamba, ``ssd_scan`` for Mamba2), differentiable.
- a :class:`MambaCache` from ``new_cache(batch)``: x continues the cached sequences and the cache is
  updated in place. T = 1 without autograd is the decode step (``causal_conv1d_update`` +
  ``selective_state_update``); otherwise (a prompt on an empty cache, or T > 1 on a non-empty one:
  chunked prefill) the conv starts from the cached inputs and the scan from the cached state, and
  the final states are written back (detached). Mamba-1's ``selective_scan`` has no initial state:
  on a non-empty cache the contribution of the cached state,
  ``<exp(A cumsum(dt)) h0, C_t>``, is added to a scan from zero (exact, differentiable).

Parameters and initialisation: :mod:`fastlayers._mamba_layers`; the pure-PyTorch reference modules
(same state_dict, same cache semantics): :class:`fastlayers.reference.Mamba` / ``Mamba2``.
"""
import torch
from torch.nn import functional as F

from . import ops
from ._dtypes import stat_dtype
from ._mamba_layers import NORM_EPS, Mamba2Base, MambaBase, MambaCache, f32  # noqa: F401

_CARRY_BLOCK = 256  # tokens per block when adding a cached state's contribution (bounds a (b, d, n, block) temp)


def _grad_needed(x, module):
    return torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in module.parameters()))


def _push_conv_state(cache, xc):
    """The cache's conv state <- the last d_conv inputs of [conv_state, xc] (xc ``(b, C, T)``)."""
    st = cache.conv_state
    w = st.shape[-1]
    with torch.no_grad():
        tail = xc[..., -w:].detach().to(st.dtype)
        st.copy_(torch.cat([st, tail], dim=-1)[..., -w:] if tail.shape[-1] < w else tail)


def _conv(xc, weight, bias, cache):
    """silu(causal conv1d) of xc ``(b, C, T)``, continuing the cached inputs; updates the cache's conv state."""
    init = None
    if cache is not None and cache.seqlen > 0:
        # the last d_conv - 1 inputs, copied: the cache is overwritten below while autograd may hold this
        init = cache.conv_state[..., 1:].to(xc.dtype, memory_format=torch.contiguous_format, copy=True)
    out = ops.causal_conv1d(xc, weight, bias, "silu", initial_states=init)
    if cache is not None:
        _push_conv_state(cache, xc)
    return out


def _conv_step(xc, weight, bias, cache):
    """One decode step of the conv, xc ``(b, C)``; shifts xc into the cache's conv state."""
    st = cache.conv_state
    if st.dtype == xc.dtype:
        return ops.causal_conv1d_update(xc, st, weight, bias, "silu")
    tmp = st.to(xc.dtype)
    out = ops.causal_conv1d_update(xc, tmp, weight, bias, "silu")
    st.copy_(tmp)
    return out


def _gated_rms_norm(y, z, weight, ngroups, eps=NORM_EPS):
    """mamba_ssm's gated RMSNorm (norm_before_gate=False): ``rmsnorm_per_group(y * silu(z)) * weight`` in fp32,
    rounded once to y's dtype."""
    acc = stat_dtype(y.dtype)
    g = ops.swiglu(z.to(acc), y.to(acc))  # silu(z) * y
    w = weight.to(acc)
    if ngroups == 1:
        out = ops.rms_norm(g, w, eps)
    else:
        gs = g.shape[-1] // ngroups
        out = (ops.rms_norm(g.unflatten(-1, (ngroups, gs)), g.new_ones(gs), eps) * w.view(ngroups, gs)).flatten(-2)
    return out.to(y.dtype)


def _scan_from(u, delta, A, B, C, D, z, delta_bias, h0):
    """Mamba-1 scan (softplus dt) continuing from the state h0 ``(b, d, n)``: a scan from zero plus the decayed
    initial state's part, ``y_t += <exp(A * sum_{s<=t} dt_s) h0, C_t>``, ``h_L += exp(A * sum dt) h0``."""
    acc = h0.dtype
    y0, last = ops.selective_scan(u.to(acc), delta.to(acc), A, B.to(acc), C.to(acc), D, None, delta_bias, True,
                                  return_last_state=True)
    dt = F.softplus(delta.to(acc) + delta_bias.to(acc)[:, None])             # (b, d, L)
    cum = dt.cumsum(-1)
    Af = A.to(acc)[None, :, :, None]
    Cf = C.to(acc)
    parts = []
    for t0 in range(0, u.shape[-1], _CARRY_BLOCK):
        decay = torch.exp(Af * cum[:, :, None, t0:t0 + _CARRY_BLOCK])       # (b, d, n, blk)
        parts.append(torch.einsum("bdnl,bdn,bnl->bdl", decay, h0, Cf[..., t0:t0 + _CARRY_BLOCK]))
    y = y0 + torch.cat(parts, dim=-1)
    if z is not None:
        y = y * F.silu(z.to(acc))
    last = last + torch.exp(Af[..., 0] * cum[:, :, None, -1]) * h0
    return y.to(u.dtype), last


class _CachedForward:
    """``forward(x, cache=None)`` of both layers: a one-token step without gradients takes the decode
    kernels (``_step``); everything else the scan (``_scan``), from the cached states when given."""

    def forward(self, x, cache=None):
        self.check_input(x, cache)
        if cache is not None and x.shape[1] == 1 and not _grad_needed(x, self):
            out = self._step(x, cache)
        else:
            out = self._scan(x, cache)
        if cache is not None:
            cache.seqlen += x.shape[1]
        return out


class Mamba(_CachedForward, MambaBase):
    """``Mamba(d_model, d_state=16, d_conv=4, expand=2, dt_rank="auto", dt_min=0.001, dt_max=0.1, conv_bias=True,
    bias=False, device=None, dtype=None)``: the Mamba-1 block (mamba_ssm's parameters, see
    :mod:`fastlayers._mamba_layers`). ``forward(x, cache=None)`` and ``new_cache(batch)``: see :mod:`fastlayers.mamba`.
    """

    def _dbc(self, u):
        return F.linear(u, self.x_proj.weight).split([self.dt_rank, self.d_state, self.d_state], dim=-1)

    def _scan(self, x, cache):
        d = self.d_inner
        xz = F.linear(x, self.in_proj.weight, self.in_proj.bias)               # (b, L, 2d)
        xc, z = xz[..., :d].transpose(1, 2), xz[..., d:].transpose(1, 2)      # (b, d, L), channel-last views
        u = _conv(xc, self._conv_weight(), self.conv1d.bias, cache)
        dt, B, C = self._dbc(u.transpose(1, 2))
        delta = F.linear(dt, self.dt_proj.weight).transpose(1, 2)             # (b, d, L)
        B, C = B.transpose(1, 2), C.transpose(1, 2)                           # (b, n, L)
        A = -torch.exp(f32(self.A_log))
        D, dbias = f32(self.D), f32(self.dt_proj.bias)
        if cache is None:
            y = ops.selective_scan(u, delta, A, B, C, D, z, dbias, True)
        elif cache.seqlen == 0:
            y, last = ops.selective_scan(u, delta, A, B, C, D, z, dbias, True, return_last_state=True)
        else:
            y, last = _scan_from(u, delta, A, B, C, D, z, dbias, cache.ssm_state.clone())  # saved for backward
        if cache is not None:
            cache.ssm_state.copy_(last.detach())
        return F.linear(y.transpose(1, 2), self.out_proj.weight, self.out_proj.bias)

    def _step(self, x, cache):
        d = self.d_inner
        xz = F.linear(x[:, 0], self.in_proj.weight, self.in_proj.bias)        # (b, 2d)
        xc, z = xz[:, :d], xz[:, d:]
        u = _conv_step(xc, self._conv_weight(), self.conv1d.bias, cache)      # (b, d)
        dt, B, C = self._dbc(u)
        delta = F.linear(dt, self.dt_proj.weight)
        A = -torch.exp(f32(self.A_log))
        y = ops.selective_state_update(cache.ssm_state, u, delta, A, B, C, f32(self.D), z,
                                       f32(self.dt_proj.bias), dt_softplus=True)
        return F.linear(y, self.out_proj.weight, self.out_proj.bias)[:, None]


class Mamba2(_CachedForward, Mamba2Base):
    """``Mamba2(d_model, d_state=128, d_conv=4, expand=2, headdim=64, ngroups=1, chunk_size=256, d_xb=None,
    A_init_range=(1, 16), dt_min=0.001, dt_max=0.1, dt_limit=(0.0, inf), conv_bias=True, bias=False,
    norm_before_gate=False, device=None, dtype=None, *, d_inner=None)``: the Mamba-2 block (mamba_ssm's
    parameters); with ``d_xb`` Zebra-Llama's variant (x and B from d_xb / headdim KV groups, repeated to the
    heads after the conv). ``Mamba2.zebra(d_model, n_heads, n_kv_heads, head_dim)`` builds that layout.
    ``forward(x, cache=None)`` and ``new_cache(batch)``: see :mod:`fastlayers.mamba`.
    """

    def _split_xbc(self, xbc):
        """[x, B, C] channels ``(..., conv_dim)`` -> x ``(..., nheads, headdim)``, B, C ``(..., G, d_state)``
        (Zebra: x and B repeated from their KV groups to nheads, head i reading group i // (nheads / n_kv))."""
        _, nx, nb, nc, _ = self.split_sizes()
        xs, B, C = xbc.split([nx, nb, nc], dim=-1)
        if self.d_xb is None:
            return (xs.unflatten(-1, (self.nheads, self.headdim)), B.unflatten(-1, (self.ngroups, self.d_state)),
                    C.unflatten(-1, (self.ngroups, self.d_state)))
        rep = self.nheads // self.n_kv_groups
        xs = xs.unflatten(-1, (self.n_kv_groups, self.headdim)).repeat_interleave(rep, dim=-2)
        B = B.unflatten(-1, (self.n_kv_groups, self.d_state)).repeat_interleave(rep, dim=-2)
        return xs, B, C.unflatten(-1, (self.nheads, self.d_state))

    def _scan(self, x, cache):
        zxbcdt = F.linear(x, self.in_proj.weight, self.in_proj.bias)
        z, xbc, dt = zxbcdt.split([self.d_inner, self.conv_dim, self.nheads], dim=-1)
        xbc = _conv(xbc.transpose(1, 2), self._conv_weight(), self.conv1d.bias, cache).transpose(1, 2)
        xs, B, C = self._split_xbc(xbc)
        A = -torch.exp(f32(self.A_log))
        h0 = cache.ssm_state.clone() if cache is not None and cache.seqlen > 0 else None  # may be saved for backward
        res = ops.ssd_scan(xs, dt, A, B, C, self.chunk_size, D=self.D, dt_bias=self.dt_bias, initial_states=h0,
                           dt_softplus=True, dt_limit=self.dt_limit, return_final_states=cache is not None)
        if cache is not None:
            res, last = res
            cache.ssm_state.copy_(last.detach())
        y = _gated_rms_norm(res.flatten(-2), z, self.norm.weight, self.ngroups)
        return F.linear(y, self.out_proj.weight, self.out_proj.bias)

    def _step(self, x, cache):
        zxbcdt = F.linear(x[:, 0], self.in_proj.weight, self.in_proj.bias)   # (b, d_in_proj)
        z, xbc, dt = zxbcdt.split([self.d_inner, self.conv_dim, self.nheads], dim=-1)
        xbc = _conv_step(xbc, self._conv_weight(), self.conv1d.bias, cache)
        xs, B, C = self._split_xbc(xbc)                                       # (b, h, p), (b, G, n), (b, G, n)
        h, p, n = self.nheads, self.headdim, self.d_state
        A = (-torch.exp(f32(self.A_log)))[:, None, None].expand(h, p, n)
        D = self.D[:, None].expand(h, p)
        if self.dt_limit == (0.0, float("inf")):
            dt_e, dt_bias, softplus = dt[..., None].expand(-1, h, p), self.dt_bias[:, None].expand(h, p), True
        else:  # the state update has no dt_limit: apply softplus and the clamp here, in fp32
            dtf = F.softplus(f32(dt) + f32(self.dt_bias)).clamp(*self.dt_limit)
            dt_e, dt_bias, softplus = dtf[..., None].expand(-1, h, p), None, False
        y = ops.selective_state_update(cache.ssm_state, xs, dt_e, A, B, C, D, None, dt_bias, dt_softplus=softplus)
        y = _gated_rms_norm(y.flatten(-2), z, self.norm.weight, self.ngroups)
        return F.linear(y, self.out_proj.weight, self.out_proj.bias)[:, None]


__all__ = ["Mamba", "Mamba2", "MambaCache"]
