"""Triton, imported once for the Triton backend modules: ``triton``, ``tl`` and ``IMPORT_ERROR`` (None, or the
ImportError that available_backends() reports; then ``triton`` and ``tl`` are None)."""
try:
    import triton
    import triton.language as tl
    IMPORT_ERROR = None
except ImportError as e:  # pragma: no cover - reported by available_backends()
    triton = tl = None
    IMPORT_ERROR = e
