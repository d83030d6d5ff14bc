"""Base model loading: the prepared 4-bit copy is the same model, only faster to load."""

from __future__ import annotations

import os

import pytest
import torch

import fedapp.llm.model as model_module
from fedapp.llm.model import load_base, prepared_dir


def logits(model) -> torch.Tensor:
    torch.manual_seed(0)
    with torch.no_grad():
        return model(input_ids=torch.randint(0, 1024, (2, 12))).logits


def test_prepared_copy_is_written_once_and_gives_the_same_model(tiny_model_dir, tmp_path,
                                                                  monkeypatch):
    monkeypatch.setenv("FEDAPP_CACHE", str(tmp_path))
    target = prepared_dir(str(tiny_model_dir), "cpu")

    first = load_base(str(tiny_model_dir), "nf4", "cpu")  # quantises, then saves
    written = (target / "config.json").stat().st_mtime_ns
    second = load_base(str(tiny_model_dir), "nf4", "cpu")  # reads the prepared copy
    monkeypatch.setenv("FEDAPP_PREPARED", "0")
    unprepared = load_base(str(tiny_model_dir), "nf4", "cpu")

    assert target.parent == tmp_path / "prepared"
    assert (target / "config.json").stat().st_mtime_ns == written
    assert type(second.model.layers[0].mlp.up_proj).__name__ == "ScratchLinear4bit"  # 4-bit
    assert not second.model.layers[0].mlp.up_proj.support_avx512bf16_for_cpu  # bnb fix on
    torch.testing.assert_close(logits(second), logits(first))
    torch.testing.assert_close(logits(unprepared), logits(first))


def test_a_changed_model_folder_is_prepared_again(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("FEDAPP_CACHE", str(tmp_path))
    before = prepared_dir(str(tiny_model_dir), "cpu")
    weights = tiny_model_dir / "model.safetensors"
    stat = weights.stat()

    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))
    try:
        after = prepared_dir(str(tiny_model_dir), "cpu")
    finally:
        os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))

    assert before != after


def test_a_large_checkpoint_is_quantised_in_a_helper_process(tiny_model_dir, tmp_path,
                                                              monkeypatch):
    """Above the size limit, the prepared copy is made by a helper process: this process
    only ever loads the 4-bit copy (same model as quantising here)."""
    monkeypatch.setenv("FEDAPP_CACHE", str(tmp_path))
    monkeypatch.setattr(model_module, "HELPER_PREPARES_ABOVE", 0)
    made = []
    real = model_module.prepare_elsewhere
    monkeypatch.setattr(model_module, "prepare_elsewhere",
                        lambda *args: made.append(args) or real(*args))
    helped = load_base(str(tiny_model_dir), "nf4", "cpu")
    assert made == [(str(tiny_model_dir), "cpu")]
    assert (prepared_dir(str(tiny_model_dir), "cpu") / "config.json").exists()
    monkeypatch.setenv("FEDAPP_PREPARED", "0")
    torch.testing.assert_close(logits(helped), logits(load_base(str(tiny_model_dir), "nf4",
                                                                "cpu")))


def test_a_failing_helper_names_the_model_and_the_reason(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(RuntimeError, match=f"quantising {tmp_path} failed: .+"):
        model_module.prepare_elsewhere(str(tmp_path), "cpu")


def test_fp32_compute_switches_every_4bit_layer_and_keeps_the_loss(tiny_model_dir):
    import bitsandbytes as bnb

    from fedapp.llm.loss import lm_loss
    from tests.test_loss import _batch

    base = load_base(str(tiny_model_dir), "nf4", "cpu")
    layers = [m for m in base.modules() if isinstance(m, bnb.nn.Linear4bit)]
    batch = _batch(base.config.vocab_size)
    with torch.no_grad():
        before = float(lm_loss(base, batch))
        assert model_module.compute_in_fp32(base) == len(layers) > 0
        after = float(lm_loss(base, batch))
    assert {layer.compute_dtype for layer in layers} == {torch.float32}
    assert after == pytest.approx(before, abs=1e-3)
