"""Initialise the layers of a hybrid model from a trained Transformer's attention weights.

Each function takes the attention projections in ``nn.Linear`` layout (``(out_features,
in_features)``, as in a Hugging Face Llama checkpoint) and returns a state_dict for one fastlayers
layer; the parameters the attention does not provide keep that layer's own initialisation.

- :func:`attention_to_mamba2`: Zebra-Llama's / MambaInLlama's Mamba-2 layer (``Mamba2.zebra``).
- :func:`attention_to_mla`: Zebra-Llama's grouped MLA (X-EcoMLA's SVD initialisation; in
  :mod:`fastlayers._convert_mla`, where the RoPE handling is documented).
"""
import torch

from ._convert_mla import attention_to_mla, mla_rope_channels  # noqa: F401
from ._layers import _positive_int


# ============================================================================= attention -> Mamba-2 (Zebra-Llama)
def _check_proj(fn, name, w, shape):
    if not isinstance(w, torch.Tensor) or not w.dtype.is_floating_point:
        raise TypeError(f"{fn}: {name} must be a floating torch.Tensor; got {getattr(w, 'dtype', type(w).__name__)}")
    if tuple(w.shape) != tuple(shape):
        raise ValueError(f"{fn}: {name} must have shape {tuple(shape)} (nn.Linear's (out, in) layout); "
                         f"got {tuple(w.shape)}")


def attention_to_mamba2(w_q, w_k, w_v, w_o, n_heads, n_kv_heads, head_dim=None, d_conv=4, *, generator_seed=None,
                        **kw):
    """A state_dict for ``Mamba2.zebra(d_model, n_heads, n_kv_heads, head_dim, d_conv, **kw)`` initialised from an
    attention layer, as Zebra-Llama / MambaInLlama do (the linear-attention view of Mamba-2: C ~ query,
    B ~ key, x ~ value):

    - ``in_proj.weight`` rows, in the layer's order [z, x, B, C, dt]:
      ``[d_inner : d_inner + d_xb]`` (x) <- ``w_v``; ``[d_inner + d_xb : d_inner + 2 d_xb]`` (B) <- ``w_k``;
      ``[d_inner + 2 d_xb : 2 d_inner + 2 d_xb]`` (C) <- ``w_q``;
      (d_inner = n_heads * head_dim, d_xb = n_kv_heads * head_dim);
    - ``out_proj.weight`` <- ``w_o``;
    - everything else keeps Mamba2's own initialisation, as in MambaInLlama (which copies only these four):
      the z rows ``[0 : d_inner]`` and dt rows ``[-n_heads:]`` of in_proj (nn.Linear's default), conv1d
      (nn.Conv1d's default), ``A_log`` (log of A uniform in A_init_range), ``dt_bias`` (inverse softplus of dt
      log-uniform in [dt_min, dt_max]), ``D`` = 1, ``norm.weight`` = 1; an in_proj / out_proj bias (``bias=True``)
      keeps its default too. ``generator_seed`` makes that part reproducible (``torch.manual_seed`` within a
      forked RNG state; the global RNG is left untouched).

    Shapes: ``w_q`` ``(n_heads * head_dim, d_model)``, ``w_k``, ``w_v`` ``(n_kv_heads * head_dim, d_model)``,
    ``w_o`` ``(d_model, n_heads * head_dim)``; head_dim defaults to ``w_q.shape[0] // n_heads``. Returns tensors
    on w_q's device in w_q's dtype (``A_log``, ``D`` as the layer makes them); ``kw`` goes to ``Mamba2.zebra``.
    RoPE has no counterpart in the Mamba layer and is dropped.
    """
    from .mamba import Mamba2

    fn = "attention_to_mamba2"
    n_heads = _positive_int(fn, "n_heads", n_heads)
    n_kv_heads = _positive_int(fn, "n_kv_heads", n_kv_heads)
    if n_heads % n_kv_heads:
        raise ValueError(f"{fn}: n_kv_heads ({n_kv_heads}) must divide n_heads ({n_heads})")
    if not isinstance(w_q, torch.Tensor) or w_q.dim() != 2:
        raise ValueError(f"{fn}: w_q must be a 2-D tensor (n_heads * head_dim, d_model); got "
                         f"{tuple(getattr(w_q, 'shape', ()))}")
    if head_dim is None:
        if w_q.shape[0] % n_heads:
            raise ValueError(f"{fn}: w_q has {w_q.shape[0]} rows, not a multiple of n_heads ({n_heads}); give head_dim")
        head_dim = w_q.shape[0] // n_heads
    head_dim = _positive_int(fn, "head_dim", head_dim)
    d_model = w_q.shape[1]
    d_inner, d_xb = n_heads * head_dim, n_kv_heads * head_dim
    _check_proj(fn, "w_q", w_q, (d_inner, d_model))
    _check_proj(fn, "w_k", w_k, (d_xb, d_model))
    _check_proj(fn, "w_v", w_v, (d_xb, d_model))
    _check_proj(fn, "w_o", w_o, (d_model, d_inner))
    with torch.random.fork_rng(devices=[w_q.device] if w_q.device.type == "cuda" else []):
        if generator_seed is not None:
            torch.manual_seed(generator_seed)
        layer = Mamba2.zebra(d_model, n_heads, n_kv_heads, head_dim, d_conv, device=w_q.device, dtype=w_q.dtype, **kw)
    sd = {k: v.detach().clone() for k, v in layer.state_dict().items()}
    w_in = sd["in_proj.weight"]
    w_in[d_inner:d_inner + d_xb] = w_v
    w_in[d_inner + d_xb:d_inner + 2 * d_xb] = w_k
    w_in[d_inner + 2 * d_xb:2 * d_inner + 2 * d_xb] = w_q
    sd["out_proj.weight"] = w_o.detach().to(sd["out_proj.weight"].dtype).clone()
    return sd


__all__ = ["attention_to_mamba2", "attention_to_mla", "mla_rope_channels"]
