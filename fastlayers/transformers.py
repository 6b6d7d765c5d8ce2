"""Run Hugging Face ``transformers`` models on fastlayers' kernels.

``fastlayers.transformers.apply(model)`` patches an instantiated transformers model in place and
returns a report of what it replaced. Each patched module keeps its parameters, buffers and
attributes; only its class is swapped for a subclass whose ``forward`` calls fastlayers ops, so
``state_dict()``, ``save_pretrained`` and ``from_pretrained`` are unchanged (a reloaded model is a
plain transformers model again: call ``apply`` on it too). ``revert(model)`` restores the classes.

What is patched, per ``config.model_type``:

- ``llama``, ``qwen3``, ``olmo2``: every RMSNorm module -> :func:`fastlayers.rms_norm`; the gated MLP
  ``down_proj(act(gate_proj(x)) * up_proj(x))`` with a SiLU activation -> ``down_proj(fastlayers.swiglu(
  gate_proj(x), up_proj(x)))`` (the two projections stay separate: no fused weight, no new parameter);
  the attention module's q/k normalisation + rotary embedding -> :func:`fastlayers.qkv_norm_rope`
  (Qwen3's per-head ``q_norm``/``k_norm`` fused with RoPE; OLMo2's full-width ``q_norm``/``k_norm``
  run as :func:`fastlayers.rms_norm` over the whole projection, then RoPE; Llama: RoPE only). The
  model's own attention function (``config._attn_implementation``: sdpa, eager, ...) and KV cache
  are still used.
- ``mamba2``: every ``Mamba2RMSNorm`` -> :func:`fastlayers.rms_norm`; the ``Mamba2Mixer`` ->
  :func:`fastlayers.causal_conv1d` + :func:`fastlayers.ssd_scan` (training, scoring, prefill,
  chunked prefill with a cache), :func:`fastlayers.causal_conv1d_update` +
  :func:`fastlayers.selective_state_update` (cached decoding), and the gated RMSNorm on fastlayers'
  ``swiglu`` + ``rms_norm``.

Not patched: the linear layers, embeddings, the attention kernel itself, the residual adds, and
modules whose configuration the kernels do not cover (an activation other than SiLU in an MLP or a
mixer; Qwen3 q/k norms with different eps; a norm whose weight dtype differs from its input falls
back to the original forward at call time). An unknown ``model_type`` raises ``ValueError`` naming
the supported ones, before anything is changed: the patches are all collected and checked first,
then applied together.

``transformers`` is imported lazily (by ``apply``), never by ``import fastlayers``.
"""
from __future__ import annotations

import importlib

import torch
import torch.nn.functional as F

from . import ops

SUPPORTED = ("llama", "qwen3", "olmo2", "mamba2")

# model_type -> (transformers module, {kind: class name})
_ARCH = {
    "llama": ("transformers.models.llama.modeling_llama",
              {"norm": "LlamaRMSNorm", "mlp": "LlamaMLP", "attn": "LlamaAttention"}),
    "qwen3": ("transformers.models.qwen3.modeling_qwen3",
              {"norm": "Qwen3RMSNorm", "mlp": "Qwen3MLP", "attn": "Qwen3Attention"}),
    "olmo2": ("transformers.models.olmo2.modeling_olmo2",
              {"norm": "Olmo2RMSNorm", "mlp": "Olmo2MLP", "attn": "Olmo2Attention"}),
    "mamba2": ("transformers.models.mamba2.modeling_mamba2",
               {"norm": "Mamba2RMSNorm", "mixer": "Mamba2Mixer"}),
}
_SILU = ("silu", "swish")


# ----------------------------------------------------------------------------- forwards
def _norm_forward(self, hidden_states):
    w = self.weight
    if w.dtype != hidden_states.dtype:  # transformers' result dtype would differ: keep its own math
        return self._fastlayers_base.forward(self, hidden_states)
    return ops.rms_norm(hidden_states, w, self.variance_epsilon)


def _mlp_forward(self, x):
    return self.down_proj(ops.swiglu(self.gate_proj(x), self.up_proj(x)))


def _rope(q, k, v, qw, kw, eps, cos, sin):
    """qkv_norm_rope on (B, T, H, D) q/k/v with transformers' per-token tables cos/sin (B or 1, T, D).

    transformers' tables are already gathered at each token's position (any position_ids, left
    padding included): with a batch of tables, the batch is folded into one sequence of B*T
    positions whose table row i is token i's own row (offset 0)."""
    b, t, _, d = q.shape
    if cos.dim() == 2:
        cos, sin = cos[None], sin[None]
    if cos.shape[0] == 1:
        qo, ko, _ = ops.qkv_norm_rope(q, k, v, qw, kw, None, cos[0], sin[0], eps=eps, offset=0)
        return qo, ko
    fold = (lambda x: x.reshape(1, b * t, x.shape[2], d))
    qo, ko, _ = ops.qkv_norm_rope(fold(q), fold(k), fold(v), qw, kw, None, cos.reshape(b * t, -1),
                                  sin.reshape(b * t, -1), eps=eps, offset=0)
    return qo.view(b, t, -1, d), ko.view(b, t, -1, d)


def _attn_forward(self, hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None,
                  **kwargs):
    mod = importlib.import_module(self._fastlayers_module)
    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, self.head_dim)
    q, k, v = self.q_proj(hidden_states), self.k_proj(hidden_states), self.v_proj(hidden_states)
    qk_norm = self._fastlayers_qk_norm
    if qk_norm == "full":  # OLMo2: RMSNorm over all heads together (the patched norm modules)
        q, k = self.q_norm(q), self.k_norm(k)
    q, k, v = q.view(hidden_shape), k.view(hidden_shape), v.view(hidden_shape)
    qw = kw = None
    eps = 1e-6
    if qk_norm == "head":  # Qwen3: per-head RMSNorm over head_dim, fused with RoPE
        if self.q_norm.weight.dtype == q.dtype and self.k_norm.weight.dtype == q.dtype:
            qw, kw, eps = self.q_norm.weight, self.k_norm.weight, self.q_norm.variance_epsilon
        else:
            q, k = self.q_norm(q), self.k_norm(k)
    cos, sin = position_embeddings
    q, k = _rope(q, k, v, qw, kw, eps, cos, sin)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if past_key_values is not None:
        k, v = past_key_values.update(k, v, self.layer_idx)
    attention_interface = mod.ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation,
                                                                     mod.eager_attention_forward)
    if hasattr(self, "sliding_window"):
        kwargs["sliding_window"] = self.sliding_window
    out, weights = attention_interface(self, q, k, v, attention_mask,
                                       dropout=0.0 if not self.training else self.attention_dropout,
                                       scaling=self.scaling, **kwargs)
    out = out.reshape(*input_shape, -1).contiguous()
    return self.o_proj(out), weights


def _gated_norm(norm, y, z, dtype):
    """transformers' MambaRMSNormGated (gate after: rmsnorm_per_group(y * silu(z)) * weight), in fp32."""
    acc = torch.float32 if y.dtype != torch.float64 else torch.float64
    g = ops.swiglu(z.to(acc), y.to(acc))  # silu(z) * y
    w = norm.weight.to(acc)
    n = g.shape[-1]
    gs = norm.group_size
    if gs == n:
        out = ops.rms_norm(g, w, norm.variance_epsilon)
    else:
        out = (ops.rms_norm(g.unflatten(-1, (n // gs, gs)), g.new_ones(gs), norm.variance_epsilon)
               * w.view(n // gs, gs)).flatten(-2)
    return out.to(dtype)


def _mask(x, attention_mask):
    if attention_mask is None:
        return x
    return (x * attention_mask[:, :, None]).to(x.dtype)


def _mixer_forward(self, hidden_states, cache_params=None, attention_mask=None, **kwargs):
    """Mamba2Mixer.forward on fastlayers ops; the cache is driven exactly as transformers' own path."""
    bsz, seq_len, _ = hidden_states.shape
    dtype = hidden_states.dtype
    conv_state = recurrent_state = None
    if cache_params is not None:
        conv_state = cache_params.get_conv_state(self.layer_idx, state_idx=0)
        recurrent_state = cache_params.get_recurrent_state(self.layer_idx, state_idx=0)
    hidden_states = _mask(hidden_states, attention_mask)
    proj = self.in_proj(hidden_states)
    A = -torch.exp(self.A_log.float())
    gate, xbc, dt = proj.split([self.intermediate_size, self.conv_dim, self.num_heads], dim=-1)
    w = self.conv1d.weight.squeeze(1)
    bias = self.conv1d.bias
    act = "silu" if self.activation in _SILU else None
    xbc = xbc.transpose(1, 2)  # (B, C, T) channel-last view: read in place by causal_conv1d
    if conv_state is not None and seq_len == 1 and not cache_params.is_recording_past(self.layer_idx):
        xbc = ops.causal_conv1d_update(xbc.to(w.dtype), conv_state, w, bias, act).to(dtype)
    else:
        if cache_params is not None:
            xbc = cache_params.update_conv_state(xbc, self.layer_idx, conv_kernel_size=self.conv_kernel_size)
        xbc = ops.causal_conv1d(xbc.to(w.dtype), w, bias, act).to(dtype)
        if cache_params is not None:
            xbc = xbc[:, :, -seq_len:]
    xbc = _mask(xbc.transpose(1, 2), attention_mask)
    gs = self.n_groups * self.ssm_state_size
    x, B, C = torch.split(xbc, [self.intermediate_size, gs, gs], dim=-1)
    if recurrent_state is not None and seq_len == 1:
        p, n = self.head_dim, self.ssm_state_size
        y = ops.selective_state_update(
            recurrent_state, x.reshape(bsz, self.num_heads, p), dt.transpose(1, 2).expand(-1, -1, p),
            A[:, None, None].expand(-1, p, n), B.reshape(bsz, self.n_groups, n), C.reshape(bsz, self.n_groups, n),
            self.D[:, None].expand(-1, p), None, self.dt_bias[:, None].expand(-1, p), dt_softplus=True)
        y = y.reshape(bsz, 1, -1)
    else:
        with_state = cache_params is not None
        # x in fp32 (as transformers' own path): the scan output goes into the gated norm unrounded
        res = ops.ssd_scan(x.reshape(bsz, seq_len, self.num_heads, self.head_dim).float(), dt, A,
                           B.reshape(bsz, seq_len, self.n_groups, self.ssm_state_size),
                           C.reshape(bsz, seq_len, self.n_groups, self.ssm_state_size), self.chunk_size, D=self.D,
                           dt_bias=self.dt_bias, initial_states=recurrent_state, dt_softplus=True,
                           dt_limit=tuple(self.time_step_limit), return_final_states=with_state)
        if with_state:
            y, final = res
            cache_params.update_recurrent_state(final, layer_idx=self.layer_idx)
        else:
            y = res
        y = y.reshape(bsz, seq_len, -1)
    y = _gated_norm(self.norm, y, gate, dtype)
    return self.out_proj(y)


# ----------------------------------------------------------------------------- classes
_PATCHED = {}  # (original class, kind) -> patched subclass


def _patched_class(cls, kind, module_name, qk_norm=None):
    key = (cls, kind, qk_norm)
    if key not in _PATCHED:
        fwd = {"norm": _norm_forward, "mlp": _mlp_forward, "attn": _attn_forward, "mixer": _mixer_forward}[kind]
        attrs = {"forward": fwd, "_fastlayers_base": cls, "_fastlayers_kind": kind,
                 "_fastlayers_module": module_name, "__module__": __name__,
                 "__doc__": f"{cls.__name__} with its forward on fastlayers kernels ({kind})."}
        if qk_norm is not None:
            attrs["_fastlayers_qk_norm"] = qk_norm
        _PATCHED[key] = type(f"Fast{cls.__name__}", (cls,), attrs)
    return _PATCHED[key]


def _is_patched(module):
    return "_fastlayers_base" in type(module).__dict__


def _act_is_silu(act_fn):
    """The module's own activation (not the config's name: a model may have swapped it)."""
    return isinstance(act_fn, torch.nn.SiLU) or type(act_fn).__name__ == "SiLUActivation"


_KINDS = ("norm", "mlp", "attn", "mixer")


def plan(model, kinds=_KINDS):
    """The patches :func:`apply` would make, as a list of ``(module path, module, patched class)``; changes nothing.

    Raises ``ValueError`` for a model that is not a transformers model of a supported ``model_type``."""
    bad = [k for k in kinds if k not in _KINDS]
    if bad:
        raise ValueError(f"fastlayers.transformers.apply: unknown kinds {bad}; choose from {list(_KINDS)}")
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if not isinstance(model, torch.nn.Module) or model_type is None:
        raise ValueError(f"fastlayers.transformers.apply: expected an instantiated transformers model (an "
                         f"nn.Module with a .config.model_type); got {type(model).__name__}")
    if model_type not in _ARCH:
        raise ValueError(f"fastlayers.transformers.apply: model_type {model_type!r} ({type(model).__name__}) is not "
                         f"supported; supported model types: {', '.join(SUPPORTED)}")
    module_name, names = _ARCH[model_type]
    mod = importlib.import_module(module_name)
    classes = {getattr(mod, name): kind for kind, name in names.items()}
    out = []
    for path, m in model.named_modules():
        if _is_patched(m):
            continue
        kind = classes.get(type(m))
        if kind is None or kind not in kinds:
            continue
        qk = None
        if kind == "mlp":
            if not _act_is_silu(getattr(m, "act_fn", None)) or not hasattr(m, "gate_proj"):
                continue
        elif kind == "attn":
            if model_type == "qwen3":
                if m.q_norm.variance_epsilon != m.k_norm.variance_epsilon or m.head_dim % 2:
                    continue
                qk = "head"
            elif model_type == "olmo2":
                qk = "full"
            else:
                qk = "none"
            if m.head_dim % 2:
                continue
        elif kind == "mixer":
            if m.activation not in _SILU and m.activation is not None:
                continue
        out.append((path, m, _patched_class(type(m), kind, module_name, qk)))
    return out


def apply(model, kinds=_KINDS):
    """Patch ``model`` (a transformers ``PreTrainedModel`` of type llama, qwen3, olmo2 or mamba2) in place.

    ``kinds``: which modules to patch, any of ``"norm"`` (RMSNorm modules), ``"mlp"`` (gated SiLU MLPs),
    ``"attn"`` (q/k norm + RoPE of the attention modules), ``"mixer"`` (Mamba-2 mixers); default all.

    Returns the report: a list of ``(module path, original class)`` for every module whose forward now runs
    on fastlayers kernels (empty when the model was already patched). The parameters, buffers and
    ``state_dict`` are untouched. All patches are collected and checked before any is applied; an
    unsupported model raises ``ValueError`` and is left unchanged."""
    todo = plan(model, tuple(kinds))
    for _, m, new_cls in todo:
        m.__class__ = new_cls
    return [(path, new_cls._fastlayers_base) for path, _, new_cls in todo]


def revert(model):
    """Undo :func:`apply`: every patched module gets its original class back. Returns the paths restored."""
    done = []
    for path, m in model.named_modules():
        if _is_patched(m):
            m.__class__ = type(m)._fastlayers_base
            done.append(path)
    return done


__all__ = ["apply", "revert", "plan", "SUPPORTED"]
