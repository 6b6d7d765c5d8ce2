"""dtype codes shared with the C++/CUDA modules (csrc/include/fastlayers/common.h)."""
import torch

F32, F16, BF16, F64 = 0, 1, 2, 3
CODES = {torch.float32: F32, torch.float16: F16, torch.bfloat16: BF16, torch.float64: F64}
FLOATING = tuple(CODES)
LOW_PRECISION = (torch.float16, torch.bfloat16)


def code(t):
    """dtype code of a tensor (or of a dtype); -1 for None."""
    if t is None:
        return -1
    dt = t if isinstance(t, torch.dtype) else t.dtype
    return CODES[dt]


def ptr(t):
    """Raw address of a tensor's first element, 0 for None. A non-empty tensor at address 0 (a wrapper
    subclass such as DTensor that slipped past the ops' checks) is an error, never a pointer for a kernel."""
    if t is None:
        return 0
    p = t.data_ptr()
    if not p and t.numel():
        raise TypeError(f"fastlayers: a {type(t).__name__} with no data pointer reached a kernel (a tensor "
                        f"subclass such as DTensor?); pass plain torch.Tensors")
    return p


def stride0(t):
    """Row stride (elements) of a 2-D row-strided tensor, 0 for None."""
    return 0 if t is None else t.stride(0)


def stat_dtype(x_dtype):
    """Accumulator / statistics dtype: float64 for float64 inputs, float32 otherwise."""
    return torch.float64 if x_dtype == torch.float64 else torch.float32
