"""Public ops. Each validates its arguments once, picks a backend, allocates the
outputs and calls the kernel; each is also a ``torch.library`` custom op in the
``fastlayers`` namespace, used while ``torch.compile`` traces."""
from .norm import layer_norm, rms_norm  # noqa: F401
from .hybridnorm import qkv_norm_rope, qkv_norm_rope_packed, swiglu  # noqa: F401
from .scan import selective_scan, selective_state_update  # noqa: F401
from .mla import mla_decode  # noqa: F401
from .conv1d import causal_conv1d, causal_conv1d_update, causal_conv1d_varlen_states  # noqa: F401
from .ssd import ssd_scan  # noqa: F401
