"""The chunked loss equals the model's own loss (value and gradients) without ever calling
the output head; gradient checkpointing changes nothing but memory and time."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fedapp.llm.adapters import attach_lora, detach_lora
from fedapp.llm.data import IGNORE_INDEX, collate
from fedapp.llm.loss import chunkable_head, chunked_cross_entropy, labelled_logprobs, lm_loss
from fedapp.llm.model import load_base
from fedapp.llm.train import set_gradient_checkpointing, train_steps

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def plain_loss_and_grad(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                        softcap: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The oracle: full (softcapped) logits, plain cross-entropy, and d(3·loss)/d hidden."""
    logits = hidden @ weight.T
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    plain = F.cross_entropy(logits, targets)
    (grad,) = torch.autograd.grad(plain * 3.0, hidden)
    return plain, grad


@pytest.mark.parametrize("softcap", [None, 5.0])
@pytest.mark.parametrize("rows", [1, 4, 7, 100])
def test_chunked_cross_entropy_matches_the_plain_one(softcap, rows):
    torch.manual_seed(0)
    hidden = torch.randn(23, 16, requires_grad=True)
    weight = torch.randn(50, 16)
    targets = torch.randint(0, 50, (23,))
    chunked = chunked_cross_entropy(hidden, weight, targets, softcap, rows)
    (grad_chunked,) = torch.autograd.grad(chunked * 3.0, hidden)
    plain, grad_plain = plain_loss_and_grad(hidden, weight, targets, softcap)
    assert float(chunked) == pytest.approx(float(plain), rel=1e-6)
    torch.testing.assert_close(grad_chunked, grad_plain, rtol=1e-5, atol=1e-6)


def test_chunked_cross_entropy_refuses_an_empty_batch():
    with pytest.raises(ValueError, match="no labelled tokens"):
        chunked_cross_entropy(torch.zeros(0, 4), torch.zeros(3, 4), torch.zeros(0, dtype=torch.long))


def _batch(vocab: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    ids = torch.randint(1, vocab, (3, 20))
    mask = torch.ones_like(ids)
    mask[2, 15:] = 0  # a padded row
    labels = ids.clone()
    labels[:, :8] = IGNORE_INDEX  # the prompt
    labels[mask == 0] = IGNORE_INDEX
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _lora_grads(model, batch, loss: str) -> tuple[float, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    value = lm_loss(model, batch, loss)
    value.backward()
    grads = [p.grad.flatten() for p in model.parameters() if p.requires_grad]
    return float(value), torch.cat(grads)


@pytest.mark.parametrize("quantization", ["none", "nf4"])
def test_lm_loss_equals_the_models_own_loss_and_gradients(tiny_model_dir, quantization):
    base = load_base(str(tiny_model_dir), quantization, "cpu")
    model = attach_lora(base, 4, 8, TARGETS, seed=0)
    for name, param in model.named_parameters():
        if "lora_B" in name:  # a non-zero B, so that every LoRA factor gets a gradient
            torch.nn.init.normal_(param, std=0.05)
    batch = _batch(base.config.vocab_size)
    plain_loss, plain_grads = _lora_grads(model, batch, "plain")
    chunked_loss, chunked_grads = _lora_grads(model, batch, "chunked")
    assert float(model(**batch).loss) == pytest.approx(plain_loss, abs=0)
    assert chunked_loss == pytest.approx(plain_loss, abs=1e-5)
    assert float((chunked_grads - plain_grads).norm() / plain_grads.norm()) < 1e-4
    detach_lora(model)


def test_the_chunked_loss_never_calls_the_output_head(tiny_model_dir, monkeypatch):
    base = load_base(str(tiny_model_dir), "nf4", "cpu")
    batch = _batch(base.config.vocab_size)
    expected = float(lm_loss(base, batch, "plain"))

    def full_logits(*args, **kwargs):
        raise AssertionError("the full-vocabulary logits were computed")

    monkeypatch.setattr(base.get_output_embeddings(), "forward", full_logits)
    assert float(lm_loss(base, batch, "chunked")) == pytest.approx(expected, abs=1e-5)
    assert base.get_output_embeddings().weight is base.get_input_embeddings().weight  # still tied


def test_a_head_it_cannot_chunk_falls_back_to_the_plain_loss(tiny_model_dir):
    base = load_base(str(tiny_model_dir), "none", "cpu")
    assert chunkable_head(base) is base.get_output_embeddings()
    base.get_output_embeddings().weight.requires_grad_(True)  # a trained head needs its grad
    assert chunkable_head(base) is None
    batch = _batch(base.config.vocab_size)
    assert float(lm_loss(base, batch, "chunked")) == pytest.approx(
        float(base(**batch).loss), abs=0)
    with pytest.raises(ValueError, match="train.loss='fused'; allowed"):
        lm_loss(base, batch, "fused")


def _train(tiny_model_dir, loss: str, checkpointing: bool) -> list[float]:
    base = load_base(str(tiny_model_dir), "nf4", "cpu")
    set_gradient_checkpointing(base, checkpointing)
    model = attach_lora(base, 4, 8, TARGETS, seed=0)
    batch = _batch(base.config.vocab_size)
    losses = []
    for _ in range(4):
        losses.append(train_steps(model, iter([batch]), 1, 1e-2, log_every=0, loss=loss).loss)
    return losses


def test_training_with_the_chunked_loss_follows_the_plain_one(tiny_model_dir):
    plain = _train(tiny_model_dir, "plain", False)
    assert plain[-1] < plain[0] - 0.01  # it trains
    assert _train(tiny_model_dir, "chunked", False) == pytest.approx(plain, abs=1e-3)


def test_gradient_checkpointing_changes_no_number(tiny_model_dir):
    assert _train(tiny_model_dir, "chunked", True) == pytest.approx(
        _train(tiny_model_dir, "chunked", False), abs=1e-6)


class LargestOutput(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the element count of the largest tensor any op produces."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, tuple | list) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_a_262k_vocabulary_never_gets_its_full_logits(tmp_path):
    """Gemma-3's 262,144-token vocabulary (the model family where the plain loss cost most):
    the chunked loss gives the plain loss's value and gradients while no op ever produces
    more than a chunk of logits."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    vocab = 262_144
    config = Gemma3TextConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32,
                              num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                              head_dim=8, query_pre_attn_scalar=8, sliding_window=16,
                              layer_types=["full_attention"], tie_word_embeddings=True)
    model = attach_lora(Gemma3ForCausalLM(config).requires_grad_(False), 2, 4.0, TARGETS, 0)
    ids = torch.randint(0, vocab, (2, 48))
    labels = ids.clone()
    labels[:, :8] = IGNORE_INDEX
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    probe = LargestOutput()

    with probe:
        chunked = lm_loss(model, batch)
    grads = torch.autograd.grad(chunked, [p for p in model.parameters() if p.requires_grad])
    plain_probe = LargestOutput()
    with plain_probe:
        plain = lm_loss(model, batch, loss="plain")
    plain_grads = torch.autograd.grad(plain, [p for p in model.parameters() if p.requires_grad])

    assert float(chunked) == pytest.approx(float(plain), rel=1e-5)
    for got, want in zip(grads, plain_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-6)
    full_logits = ids.numel() * vocab
    assert plain_probe.largest >= full_logits  # the plain loss holds them all at once
    assert probe.largest <= full_logits // 4  # a chunk (and the embedding), never all of it


def test_labelled_logprobs_are_the_full_log_softmax_at_the_labels(tiny_model_dir):
    model = load_base(str(tiny_model_dir), "none", "cpu")
    batch = _batch(model.config.vocab_size)

    picked, keep = labelled_logprobs(model, batch)

    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=batch["input_ids"]).logits[:, :-1].float(), -1)
    labels = batch["labels"][:, 1:]
    assert torch.equal(keep, labels != IGNORE_INDEX)
    torch.testing.assert_close(picked, logp[keep].gather(1, labels[keep][:, None]).squeeze(1),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("quantization", ["none", "nf4"])
def test_batches_padded_to_a_multiple_give_the_same_loss_and_gradients(tiny_model_dir,
                                                                       quantization):
    """train.pad_multiple: the extra positions are masked and unlabelled, so the loss and
    the LoRA gradients are those of the batch padded to its longest example."""
    base = load_base(str(tiny_model_dir), quantization, "cpu")
    model = attach_lora(base, 4, 8, TARGETS, seed=0)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.05)
    torch.manual_seed(2)
    examples = [{"input_ids": torch.randint(1, 500, (n,)).tolist(),
                 "labels": [IGNORE_INDEX] * 4 + torch.randint(1, 500, (n - 4,)).tolist()}
                for n in (13, 9, 17)]
    tight, padded = collate(examples, 0), collate(examples, 0, multiple=8)
    assert tight["input_ids"].shape == (3, 17) and padded["input_ids"].shape == (3, 24)
    assert not padded["attention_mask"][:, 17:].any()
    assert (padded["labels"][:, 17:] == IGNORE_INDEX).all()
    for loss in ("chunked", "plain"):
        tight_loss, tight_grads = _lora_grads(model, tight, loss)
        padded_loss, padded_grads = _lora_grads(model, padded, loss)
        assert padded_loss == pytest.approx(tight_loss, abs=1e-5)
        assert float((padded_grads - tight_grads).norm() / tight_grads.norm()) < 1e-4
    detach_lora(model)
