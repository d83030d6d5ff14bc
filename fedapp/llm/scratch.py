"""4-bit layers on CPU that decode their weight into one reused buffer.

bitsandbytes (0.50) computes a CPU 4-bit layer as "decode the whole weight to the compute
dtype, then a dense matmul": a fresh fp32 matrix per call, three calls per layer and step
with gradient checkpointing (forward, recomputed forward, backward). With glibc's mmap
threshold pinned (`train.release_memory`) every such matrix is a new mapping whose pages are
faulted in and zeroed again; measured on SmolLM2-135M's lean client (scripts/bench_client.py)
that made a step 1.45x as long as the fp32 client's, against 1.26x without the pin.

`ScratchLinear4bit` is bitsandbytes' `Linear4bit` with that one step changed: the weight is
decoded by bitsandbytes' own CPU kernel (the one its `dequantize_4bit` calls, same values)
into a per-thread scratch buffer sized for the largest layer, used for one matmul and
overwritten by the next layer. No decoded weight outlives its matmul: the backward pass
decodes again, as bitsandbytes' own backward does. Everything else (compute dtype, bias,
quantisation state, saving) is the parent's. Layers on other devices, and weights the
kernel does not cover (an odd input width, a nested state with another block size, a
weight bitsandbytes repacked for CPU inference, a block size of 2048+ on AVX-512, where
bitsandbytes avoids the kernel), take the parent's path. Installed by `use_scratch`
wherever the app makes 4-bit layers (loading, pruning). `tests/test_scratch.py` pins the
outputs and input gradients bit for bit against bitsandbytes' path; a bias gradient is
summed in fp32 here (bitsandbytes: in the compute dtype).
"""

from __future__ import annotations

import ctypes
import threading
from functools import cache

import torch
from torch import nn

KERNEL_DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
_scratch = threading.local()  # (slot, dtype) -> flat buffer, per thread


@cache
def _kernel(quant_type: str, dtype: torch.dtype):  # -> ctypes function or None
    """bitsandbytes' CPU decode kernel for `quant_type` into `dtype`; None where this build
    of bitsandbytes has none."""
    from bitsandbytes.cextension import lib

    native = getattr(lib, "_lib", None)
    name = f"cdequantize_blockwise_cpu_{quant_type}_{KERNEL_DTYPES.get(dtype, '')}"
    return getattr(native, name, None) if native is not None else None


def scratch(numel: int, dtype: torch.dtype, slot: str = "linear") -> torch.Tensor:
    """The first `numel` values of this thread's reused flat buffer `slot` of `dtype` (grown
    when too short). Whatever it held before is overwritten by its next user of the slot."""
    buffers = _scratch.__dict__
    held = buffers.get((slot, dtype))
    if held is None or held.numel() < numel:
        with torch.inference_mode(False):  # a normal tensor, writable in any mode later
            buffers[(slot, dtype)] = held = torch.empty(numel, dtype=dtype)
    return held[:numel]


def decodable(weight: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether `decode` covers this CPU 4-bit weight into `dtype`."""
    state = getattr(weight, "quant_state", None)
    if state is None or weight.device.type != "cpu" or len(state.shape) != 2:
        return False
    if state.shape[1] % 2 or (state.nested and state.state2.blocksize != 256) \
            or getattr(state, "packing_format_for_cpu", False) \
            or (state.blocksize >= 2048 and _has_avx512()):
        return False
    return _kernel(state.quant_type, dtype) is not None


@cache
def _has_avx512() -> bool:
    return torch.backends.cpu.get_cpu_capability() == "AVX512"  # bitsandbytes' own test


def decode(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The (out, in) matrix of a 4-bit `weight` in `dtype`, written into the scratch buffer:
    valid until the next `decode` on this thread."""
    from bitsandbytes import functional as F

    state = weight.quant_state
    rows, cols = state.shape
    absmax = state.absmax
    if state.nested:  # per-block scales are themselves 8-bit: decode them (1/64 the size)
        absmax = F.dequantize_blockwise(absmax, state.state2) + state.offset
    absmax = absmax.float().contiguous()
    packed = weight.data.contiguous().view(torch.uint8)
    out = scratch(rows * cols, dtype).view(rows, cols)
    _kernel(state.quant_type, dtype)(
        ctypes.c_void_p(packed.data_ptr()), ctypes.c_void_p(absmax.data_ptr()),
        ctypes.c_void_p(out.data_ptr()), ctypes.c_longlong(state.blocksize),
        ctypes.c_longlong(rows), ctypes.c_longlong(cols))
    return out


class _ScratchMatmul(torch.autograd.Function):
    """x Wᵀ + b with W decoded into scratch, again in the backward pass."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
                ) -> torch.Tensor:
        ctx.weight = weight  # frozen; kept off save_for_backward (no copy under checkpoints)
        return nn.functional.linear(x, decode(weight, x.dtype), bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = grad @ decode(ctx.weight, grad.dtype)
        if ctx.needs_input_grad[2]:
            grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0, dtype=torch.float32)
        return grad_x, None, grad_bias


def _linear4bit() -> type:
    import bitsandbytes as bnb

    return bnb.nn.Linear4bit


@cache
def scratch_class() -> type:
    """`ScratchLinear4bit`, built once bitsandbytes is imported (it is optional)."""

    class ScratchLinear4bit(_linear4bit()):
        """bitsandbytes' Linear4bit, decoding into the scratch buffer on CPU."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if not self.compute_type_is_set:
                self.set_compute_type(x)
                self.compute_type_is_set = True
            dtype = self.compute_dtype or x.dtype
            if x.device.type != "cpu" or not decodable(self.weight, dtype):
                return super().forward(x)
            bias = None if self.bias is None else self.bias.to(dtype)
            return _ScratchMatmul.apply(x.to(dtype), self.weight, bias).to(x.dtype)

    ScratchLinear4bit.__module__ = __name__
    ScratchLinear4bit.__qualname__ = "ScratchLinear4bit"  # pickles by name: see __getattr__
    return ScratchLinear4bit


def __getattr__(name: str) -> type:
    """`fedapp.llm.scratch.ScratchLinear4bit` by name (unpickling a model in a fresh process)."""
    if name == "ScratchLinear4bit":
        return scratch_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def use_scratch(model: nn.Module) -> int:
    """Make `model`'s CPU 4-bit layers (`model` itself may be one) decode into scratch;
    how many it changed."""
    base, changed = _linear4bit(), 0
    for module in model.modules():
        if type(module) is base and module.weight.device.type == "cpu":
            module.__class__ = scratch_class()
            module.support_avx512bf16_for_cpu = False  # no inference repack (model.py)
            changed += 1
    return changed
