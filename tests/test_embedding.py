"""The token embedding and output head in NF4 (`model.quantization=nf4-embeddings`): the
code against a brute-force oracle and bitsandbytes' own NF4, the layers and the chunked loss
against the same computation on the decoded matrix, the checkpoint read without its memory
map, and what the mode refuses."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fedapp.llm import embedding
from fedapp.llm.adapters import attach_lora
from fedapp.llm.embedding import (
    BLOCKSIZE,
    NF4_LEVELS,
    Nf4Embedding,
    Nf4Head,
    Nf4Table,
    byte_levels,
    dequantise_rows,
    quantise_embeddings,
    quantise_rows,
    tensor_rows,
)
from fedapp.llm.loss import chunked_cross_entropy, labelled_logprobs
from fedapp.llm.model import checkpoint_readers, load_base
from fedapp.llm.train import train_steps
from tests.test_loss import TARGETS, _batch, _lora_grads, plain_loss_and_grad

CODE = torch.tensor(NF4_LEVELS)


def _oracle(weight: torch.Tensor) -> torch.Tensor:
    """Each value replaced by the level nearest to it / its block's absmax, times absmax."""
    blocks = weight.reshape(weight.shape[0], -1, BLOCKSIZE)
    absmax = blocks.abs().amax(-1, keepdim=True)
    nearest = (blocks / absmax)[..., None].sub(CODE).abs().argmin(-1)
    return (CODE[nearest] * absmax).reshape(weight.shape)


def _decoded(table: Nf4Table) -> torch.Tensor:
    return torch.cat([w for _, w in table.blocks()])


def test_the_levels_are_bitsandbytes_nf4():
    import bitsandbytes.functional as bnbf

    assert torch.equal(CODE, bnbf.get_4bit_type("nf4", device="cpu"))


def test_rows_decode_to_the_nearest_level_times_the_block_absmax():
    torch.manual_seed(0)
    weight = torch.randn(7, 3 * BLOCKSIZE)
    weight[2, :BLOCKSIZE] = 0.0  # an all-zero block decodes to zeros
    packed, absmax = quantise_rows(weight, CODE)
    assert packed.dtype == torch.uint8 and packed.shape == (7, 3 * BLOCKSIZE // 2)
    decoded = dequantise_rows(packed, absmax, byte_levels(CODE))
    torch.testing.assert_close(decoded, torch.nan_to_num(_oracle(weight)), rtol=0, atol=0)
    # the first value of a row sits in the high nibble of its byte
    assert int(packed[0, 0]) >> 4 == int((weight[0, 0] / absmax[0, 0] - CODE).abs().argmin())


def test_the_code_matches_bitsandbytes_own_nf4_quantisation():
    import bitsandbytes.functional as bnbf

    torch.manual_seed(1)
    weight = torch.randn(32, 4 * BLOCKSIZE) * 0.05
    theirs_packed, state = bnbf.quantize_4bit(weight, blocksize=BLOCKSIZE, quant_type="nf4")
    theirs = bnbf.dequantize_4bit(theirs_packed, state)
    ours = dequantise_rows(*quantise_rows(weight, CODE), byte_levels(CODE))
    # equal but for values within rounding of a midpoint between two levels
    assert float((ours != theirs).float().mean()) < 1e-3
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0.2 * float(weight.abs().max()))


def test_the_layers_compute_what_the_decoded_matrix_does():
    torch.manual_seed(2)
    weight = torch.randn(300, BLOCKSIZE)
    table = Nf4Table((300, BLOCKSIZE), tensor_rows(weight))
    decoded = _decoded(table)
    torch.testing.assert_close(decoded, _oracle(weight), rtol=0, atol=0)
    ids = torch.randint(0, 300, (2, 5))
    torch.testing.assert_close(Nf4Embedding(table, None)(ids), F.embedding(ids, decoded))
    hidden = torch.randn(2, 5, BLOCKSIZE)
    torch.testing.assert_close(Nf4Head(table)(hidden), hidden @ decoded.T)


@pytest.mark.parametrize("softcap", [None, 5.0])
@pytest.mark.parametrize("rows", [1, 7, 100])
def test_the_blocked_loss_matches_the_plain_one_on_the_decoded_matrix(monkeypatch, softcap,
                                                                      rows):
    monkeypatch.setattr(embedding, "BLOCK_ROWS", 16)  # vocabulary of 50: four blocks
    torch.manual_seed(3)
    table = Nf4Table((50, BLOCKSIZE), tensor_rows(torch.randn(50, BLOCKSIZE)))
    hidden = torch.randn(23, BLOCKSIZE, requires_grad=True)
    targets = torch.randint(0, 50, (23,))
    targets[:4] = torch.tensor([0, 15, 16, 49])  # block edges
    blocked = chunked_cross_entropy(hidden, table, targets, softcap, rows)
    (grad_blocked,) = torch.autograd.grad(blocked * 3.0, hidden)
    plain, grad_plain = plain_loss_and_grad(hidden, _decoded(table), targets, softcap)
    assert float(blocked) == pytest.approx(float(plain), rel=1e-6)
    torch.testing.assert_close(grad_blocked, grad_plain, rtol=1e-5, atol=1e-6)


def test_a_model_with_4bit_embeddings_trains_and_its_losses_agree(tiny_model_dir, monkeypatch):
    monkeypatch.setattr(embedding, "BLOCK_ROWS", 100)  # several blocks of the tiny vocabulary
    base = load_base(str(tiny_model_dir), "nf4-embeddings", "cpu")
    table = base.get_input_embeddings().table
    assert type(base.get_input_embeddings()) is Nf4Embedding
    assert base.get_output_embeddings().table is table  # tied: one table
    model = attach_lora(base, 4, 8, TARGETS, seed=0)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.05)
    batch = _batch(base.config.vocab_size)
    plain_loss, plain_grads = _lora_grads(model, batch, "plain")
    chunked_loss, chunked_grads = _lora_grads(model, batch, "chunked")
    assert chunked_loss == pytest.approx(plain_loss, abs=1e-5)
    assert float((chunked_grads - plain_grads).norm() / plain_grads.norm()) < 1e-4
    logprobs, keep = labelled_logprobs(model, batch)
    full = torch.log_softmax(model(**batch).logits[:, :-1][keep].float(), -1)
    torch.testing.assert_close(logprobs, full.gather(1, batch["labels"][:, 1:][keep][:, None])
                               .squeeze(1), rtol=1e-5, atol=1e-5)
    losses = [train_steps(model, iter([batch]), 1, 1e-2, log_every=0).loss for _ in range(4)]
    assert losses[-1] < losses[0] - 0.01


def test_the_table_read_from_the_file_is_the_one_read_from_the_tensor(tiny_model_dir):
    base = load_base(str(tiny_model_dir), "nf4", "cpu")
    weight = base.get_input_embeddings().weight
    readers = checkpoint_readers(tiny_model_dir)
    from_file = Nf4Table(tuple(weight.shape), readers["model.embed_tokens.weight"])
    from_tensor = Nf4Table(tuple(weight.shape), tensor_rows(weight))
    assert torch.equal(from_file.packed, from_tensor.packed)
    assert torch.equal(from_file.absmax, from_tensor.absmax)
    assert checkpoint_readers(tiny_model_dir / "absent") == {}


def test_a_layer_it_cannot_stand_in_for_is_refused_by_name(tiny_model_dir):
    class Scaled(torch.nn.Embedding):  # as Gemma's scaled word embedding
        pass

    base = load_base(str(tiny_model_dir), "none", "cpu")
    old = base.get_input_embeddings()
    base.set_input_embeddings(Scaled(old.num_embeddings, old.embedding_dim))
    with pytest.raises(ValueError, match="needs a plain nn.Embedding; this model's is Scaled"):
        quantise_embeddings(base)
    with pytest.raises(ValueError, match="divisible by 64; this model's is 96"):
        Nf4Table((10, 96), tensor_rows(torch.zeros(10, 96)))
    with pytest.raises(ValueError, match="allowed: \\['nf4', 'nf4-embeddings', 'none'\\]"):
        load_base(str(tiny_model_dir), "nf8", "cpu")
