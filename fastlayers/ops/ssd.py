"""Mamba-2 chunked scan ``ssd_scan`` (``mamba_chunk_scan_combined``'s semantics).

Placeholder while the kernels are written: every backend runs the reference recurrence
(:func:`fastlayers.reference.ssd_scan`), differentiable by autograd.
"""
from .. import reference


def ssd_scan(x, dt, A, B, C, chunk_size=256, D=None, z=None, dt_bias=None, initial_states=None, seq_idx=None,
             dt_softplus=False, dt_limit=(0.0, float("inf")), return_final_states=False):
    """See :func:`fastlayers.reference.ssd_scan`."""
    return reference.ssd_scan(x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, seq_idx, dt_softplus,
                              dt_limit, return_final_states)
