"""Llama GQA attention -> grouped MLA weights: the X-EcoMLA / Zebra-Llama SVD initialisation.

Exposed as ``fastlayers.convert.attention_to_mla`` (this file is separate so that the MLA and the Mamba-2
conversions do not edit one file in parallel).

The attention being converted (Llama / HF layout, ``nn.Linear`` weights ``(out, in)``)::

    q_h = W_q,h x   (head_dim rows per head, H heads)      k_g = W_k,g x,  v_g = W_v,g x   (G KV heads)
    RoPE "rotate half": channel i of a head pairs with i + head_dim/2, angle p * theta^(-2i / head_dim)
    o_h = softmax(q_h . k_g(h) / sqrt(head_dim)) v_g(h),   g(h) = h // (H / G);   out = W_o [o_0; ..; o_H-1]

MLA keeps RoPE on ``rope_dim`` channels per head and none on the other ``head_dim - rope_dim`` ("nope"),
so the conversion chooses which frequency pairs keep their rotation (``rope_pairs``):

* ``"high"`` (default): the rope_dim/2 highest-frequency pairs i = 0 .. rope_dim/2 - 1 (the low frequencies
  rotate little over a context, so they lose the least);
* ``"uniform"``: every (head_dim/rope_dim)-th pair, i = 0, s, 2s, .. (s = head_dim / rope_dim).

Pair j of MLA's rope part (channels j and j + rope_dim/2) is the kept pair i_j = j * s (s = 1 for "high"):
original channels i_j and i_j + head_dim/2. Its angle ``theta^(-2 j s / head_dim)`` is MLA's
``theta_mla^(-2 j / rope_dim)`` with ``theta_mla = theta^(s * rope_dim / head_dim)``: build the MLA with that
``rope_theta`` (returned with ``return_config=True``) and the kept pairs rotate exactly as before. The other
channels become the nope part (in their original order) and lose their rotation: for a real Llama (RoPE on
every pair) that is the approximation the conversion makes, recovered by distillation. MLA's rope key is one
head shared by all: ``W_KR`` is the mean over the G KV heads of their kept-pair rows of W_k (X-EcoMLA's
choice), exact when they agree (or G = 1).

Weights (grouped MLA, n_kv_groups = G; no latent RMSNorms, ``latent_norm=False``):

* keys/values: ``M = [K_nope,0; V_0; K_nope,1; V_1; ..]`` (G (nope + head_dim) x dim), ``M = U S V^T``;
  ``wkv_a = [S_r V_r^T ; W_KR]`` (the latent carries the singular values), ``wkv_b = U_r`` (rows already in
  MLA's per-group [k_nope ; v] order), r = kv_lora_rank;
* queries, per head rows ``[q_nope ; q_rope]`` (the same channel split): ``wq`` directly
  (``q_lora_rank=None``) or ``W_q' = U S V^T``, ``wq_a = S_r V_r^T``, ``wq_b = U_r`` (r = q_lora_rank);
* ``wo = W_o``; qk_nope_head_dim = head_dim - rope_dim, v_head_dim = head_dim, so the softmax scale
  ``(nope + rope)^-1/2`` is the original ``head_dim^-1/2``.

At full rank (kv_lora_rank >= rank M, q_lora_rank None or >= rank W_q) the MLA computes the original
attention with partial RoPE (the kept pairs rotated, the rest not) exactly up to rounding; below it, the
truncated SVD is the best rank-r approximation of M (Eckart-Young), and the error falls as r grows.
SVDs run in float64; the weights come back in W_q's dtype (or ``dtype``).
"""
import torch

__all__ = ["attention_to_mla", "mla_rope_channels"]


def _check_int(name, v, lo=1):
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ValueError(f"attention_to_mla: {name} must be an int >= {lo}; got {v!r}")
    return v


def mla_rope_channels(head_dim, rope_dim, rope_pairs="high"):
    """(rope channel indices of a head in MLA's order ``[first halves ; second halves]``, nope channel indices,
    stride s): which of the original head's channels feed MLA's rope and nope parts."""
    half = head_dim // 2
    if rope_pairs == "high":
        s = 1
    elif rope_pairs == "uniform":
        if head_dim % rope_dim:
            raise ValueError(f"attention_to_mla: rope_pairs='uniform' needs rope_dim ({rope_dim}) to divide "
                             f"head_dim ({head_dim})")
        s = head_dim // rope_dim
    else:
        raise ValueError(f"attention_to_mla: rope_pairs must be 'high' or 'uniform'; got {rope_pairs!r}")
    pairs = [j * s for j in range(rope_dim // 2)]
    rope = pairs + [i + half for i in pairs]
    kept = set(rope)
    nope = [c for c in range(head_dim) if c not in kept]
    return rope, nope, s


def _lowrank(m, rank):
    """(down ``(rank, in)`` = S_r V_r^T, up ``(out, rank)`` = U_r) of float64 ``m``, zero-padded past its size."""
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    k = min(rank, s.numel())
    down = m.new_zeros(rank, m.shape[1])
    up = m.new_zeros(m.shape[0], rank)
    down[:k] = s[:k, None] * vh[:k]
    up[:, :k] = u[:, :k]
    return down, up


def attention_to_mla(w_q, w_k, w_v, w_o, n_heads, n_kv_heads, kv_lora_rank, q_lora_rank, rope_dim,
                     rope_theta=500000.0, rope_pairs="high", dtype=None, return_config=False):
    """A state_dict for :class:`fastlayers.MLA` (grouped, ``n_kv_groups = n_kv_heads``, ``latent_norm=False``)
    initialised from a Llama attention's ``w_q`` ``(H hd, dim)``, ``w_k``/``w_v`` ``(G hd, dim)``, ``w_o``
    ``(dim, H hd)`` by the SVD recipe of the module docstring.

    ``rope_dim``: channels per head that keep RoPE (even, <= head_dim); ``rope_theta``: the original RoPE
    base; ``rope_pairs``: ``"high"`` or ``"uniform"`` (which pairs keep it). With ``return_config=True``
    returns ``(state_dict, kwargs)`` where ``fastlayers.MLA(**kwargs)`` is the layer to load it into (its
    ``rope_theta`` is the rescaled base that keeps the chosen pairs' frequencies)."""
    for name, t in (("w_q", w_q), ("w_k", w_k), ("w_v", w_v), ("w_o", w_o)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2 or not t.dtype.is_floating_point:
            raise TypeError(f"attention_to_mla: {name} must be a 2-D floating tensor (an nn.Linear weight); got "
                            f"{getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}")
    H, G = _check_int("n_heads", n_heads), _check_int("n_kv_heads", n_kv_heads)
    _check_int("kv_lora_rank", kv_lora_rank)
    if q_lora_rank is not None:
        _check_int("q_lora_rank", q_lora_rank)
    if H % G:
        raise ValueError(f"attention_to_mla: n_heads ({H}) must be divisible by n_kv_heads ({G})")
    dim = w_q.shape[1]
    if w_q.shape[0] % H:
        raise ValueError(f"attention_to_mla: w_q has {w_q.shape[0]} rows, not a multiple of n_heads={H}")
    hd = w_q.shape[0] // H
    for name, t, shape in (("w_k", w_k, (G * hd, dim)), ("w_v", w_v, (G * hd, dim)), ("w_o", w_o, (dim, H * hd))):
        if tuple(t.shape) != shape:
            raise ValueError(f"attention_to_mla: {name} must be {shape} (n_kv_heads={G}, head_dim={hd}, dim={dim}); "
                             f"got {tuple(t.shape)}")
    if isinstance(rope_dim, bool) or not isinstance(rope_dim, int) or rope_dim < 0 or rope_dim % 2 or rope_dim > hd:
        raise ValueError(f"attention_to_mla: rope_dim must be an even int in 0..head_dim={hd}; got {rope_dim!r}")
    if not (isinstance(rope_theta, (int, float)) and rope_theta > 0):
        raise ValueError(f"attention_to_mla: rope_theta must be > 0; got {rope_theta!r}")
    if hd - rope_dim == 0:
        raise ValueError(f"attention_to_mla: rope_dim = head_dim = {hd} leaves no nope channels for the latent keys")
    rope, nope, s = mla_rope_channels(hd, rope_dim, rope_pairs) if rope_dim else ([], list(range(hd)), 1)
    out_dtype = dtype or w_q.dtype
    f = torch.float64
    q = w_q.detach().to(f).view(H, hd, dim)
    k = w_k.detach().to(f).view(G, hd, dim)
    v = w_v.detach().to(f).view(G, hd, dim)

    nope_i, rope_i = torch.tensor(nope), torch.tensor(rope, dtype=torch.long)
    # keys / values: joint SVD of the per-group [k_nope ; v] rows
    m = torch.cat([k[:, nope_i], v], dim=1).reshape(G * (len(nope) + hd), dim)
    down, up = _lowrank(m, kv_lora_rank)
    k_rope = k[:, rope_i].mean(0)                                           # (rope, dim), shared by the heads
    sd = {"wkv_a.weight": torch.cat([down, k_rope], dim=0), "wkv_b.weight": up}
    # queries: per head [q_nope ; q_rope] in MLA's channel order
    wq = torch.cat([q[:, nope_i], q[:, rope_i]], dim=1).reshape(H * hd, dim)
    if q_lora_rank is None:
        sd["wq.weight"] = wq
    else:
        sd["wq_a.weight"], sd["wq_b.weight"] = _lowrank(wq, q_lora_rank)
    sd["wo.weight"] = w_o.detach().to(f)
    sd = {n: t.to(out_dtype).contiguous() for n, t in sd.items()}
    if not return_config:
        return sd
    theta_mla = float(rope_theta) ** (s * rope_dim / hd) if rope_dim else float(rope_theta)
    cfg = dict(dim=dim, n_heads=H, q_lora_rank=q_lora_rank, kv_lora_rank=kv_lora_rank,
               qk_nope_head_dim=hd - rope_dim, qk_rope_head_dim=rope_dim, v_head_dim=hd, n_kv_groups=G,
               rope_theta=theta_mla, latent_norm=False)
    return sd, cfg
