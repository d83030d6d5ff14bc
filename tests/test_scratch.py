"""CPU 4-bit layers decoding into one reused buffer (`fedapp.llm.scratch`): the same outputs
and gradients as bitsandbytes' own path, bit for bit, for every quantisation state the app
makes; the buffer really reused; fallbacks; pickling; pruning keeps the layer kind."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")

from fedapp.llm import scratch
from fedapp.llm.scratch import decodable, decode, scratch_class, use_scratch


def _layer(rows: int, cols: int, quant_type: str = "nf4", nested: bool = False,
           dtype: torch.dtype = torch.float32, bias: bool = True) -> torch.nn.Module:
    torch.manual_seed(rows * 7 + cols)
    dense = torch.nn.Linear(cols, rows, bias=bias)
    layer = bnb.nn.Linear4bit(cols, rows, bias=bias, compute_dtype=dtype,
                              compress_statistics=nested, quant_type=quant_type)
    layer.weight = bnb.nn.Params4bit(dense.weight.data.clone(), requires_grad=False,
                                     compress_statistics=nested, quant_type=quant_type,
                                     module=layer).to("cpu")
    if bias:
        layer.bias = torch.nn.Parameter(dense.bias.data.clone())
    if hasattr(layer, "support_avx512bf16_for_cpu"):  # the app turns bnb's repack off
        layer.support_avx512bf16_for_cpu = False
    return layer


def _run(layer: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    x = x.detach().clone().requires_grad_(True)
    out = layer(x)
    (out.float() * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
    bias = layer.bias.grad.clone() if layer.bias is not None else torch.zeros(0)
    if layer.bias is not None:
        layer.bias.grad = None
    return out.detach(), x.grad, bias


@pytest.mark.parametrize("quant_type,nested,dtype", [
    ("nf4", False, torch.float32), ("nf4", True, torch.float32),
    ("fp4", False, torch.float32), ("nf4", False, torch.bfloat16)])
def test_outputs_and_gradients_match_bitsandbytes(quant_type, nested, dtype):
    plain = _layer(96, 192, quant_type, nested, dtype)
    mine = copy.deepcopy(plain)
    assert use_scratch(mine) == 1 and type(mine).__name__ == "ScratchLinear4bit"
    x = torch.randn(3, 5, 192)
    out, grad_x, grad_b = _run(plain, x)
    out2, grad_x2, grad_b2 = _run(mine, x)
    assert out2.dtype == out.dtype == torch.float32
    assert torch.equal(out, out2)  # the same kernel decodes, the same matmul follows
    assert torch.equal(grad_x, grad_x2)
    tolerance = 1e-5 if dtype == torch.float32 else 0.1  # bias grad: a sum (bnb: in bf16)
    assert torch.allclose(grad_b.float(), grad_b2.float(), atol=tolerance, rtol=1e-3)


def test_decode_equals_bitsandbytes_and_reuses_one_buffer():
    small, large = _layer(64, 128), _layer(96, 192)
    first = decode(large.weight, torch.float32).clone()
    expected = bnb.functional.dequantize_4bit(large.weight.data, large.weight.quant_state)
    assert torch.equal(first, expected)
    a = decode(small.weight, torch.float32)
    b = decode(large.weight, torch.float32)
    assert a.data_ptr() == b.data_ptr()  # the second decode overwrote the first's storage
    assert torch.equal(b, expected)


def test_layers_the_kernel_does_not_cover_take_bitsandbytes_path():
    odd = _layer(8, 63, bias=False)  # an odd input width: no CPU kernel
    assert not decodable(odd.weight, torch.float32)
    use_scratch(odd)
    plain = _layer(8, 63, bias=False)
    x = torch.randn(2, 63)
    assert torch.equal(odd(x), plain(x))
    assert not decodable(odd.weight, torch.int8)  # no kernel for that dtype


def test_pickles_by_name_and_leaves_other_modules_alone():
    model = torch.nn.Sequential(_layer(32, 64), torch.nn.Linear(4, 4))
    assert use_scratch(model) == 1
    assert use_scratch(model) == 0  # already converted
    back = pickle.loads(pickle.dumps(model))
    assert type(back[0]) is scratch_class() is scratch.ScratchLinear4bit
    assert type(back[1]) is torch.nn.Linear
    x = torch.randn(2, 64)
    assert torch.equal(back[0](x), model[0](x))


def test_loading_and_pruning_make_scratch_layers(tiny_model_dir):
    from fedapp.llm.model import load_base
    from fedapp.pruning.surgery import slice_linear

    model = load_base(str(tiny_model_dir), "nf4", "cpu")
    layer = next(m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit))
    assert type(layer) is scratch_class()  # load_base installed it
    sliced = slice_linear(layer, torch.arange(layer.out_features // 2),
                          torch.arange(layer.in_features))
    assert type(sliced) is scratch_class()


def test_nf4_table_blocks_reuse_one_buffer_with_the_same_values():
    from fedapp.llm.embedding import Nf4Table, tensor_rows

    torch.manual_seed(0)
    table = Nf4Table((300, 128), tensor_rows(torch.randn(300, 128)))
    fresh = [(s, w.clone()) for s, w in table.blocks(64)]
    pointers = set()
    for (start, w), (start2, expected) in zip(table.blocks(64, reuse=True), fresh, strict=True):
        assert start == start2 and torch.equal(w, expected)
        pointers.add(w.data_ptr())
    assert len(pointers) == 1  # every block decoded into the same storage


def test_a_weight_repacked_for_inference_is_not_decoded_here():
    layer = _layer(32, 64)
    layer.weight.quant_state.packing_format_for_cpu = True  # bnb's other layout
    assert not decodable(layer.weight, torch.float32)
    fresh = _layer(32, 64)
    fresh.support_avx512bf16_for_cpu = True
    use_scratch(fresh)
    assert fresh.support_avx512bf16_for_cpu is False  # it would repack on a no-grad call
