"""bitsandbytes 0.50.2 on AVX512-BF16 CPUs: an eval forward must not break later training.

Without `disable_bnb_cpu_repack`, the first no-grad eval forward repacks every Linear4bit
weight into an inference-only layout and the following backward pass gives wrong LoRA
gradients. `load_base` applies the fix; these tests pin it.
"""

from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch

from fedapp.llm.adapters import attach_lora
from fedapp.llm.model import cpu_supports_bf16, load_base

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def lora_grads(model_dir, eval_first: bool, patch: bool) -> dict[str, torch.Tensor]:
    base = load_base(str(model_dir), "nf4", "cpu")
    if not patch:  # undo the fix to show what it protects against: bitsandbytes' own
        # forward (ScratchLinear4bit never repacks, but falls back to it off CPU or for
        # weights it cannot decode), with its repack switched back on
        plain = bnb.nn.Linear4bit
        for module in base.modules():
            if isinstance(module, plain):
                module.__class__ = plain
                module.support_avx512bf16_for_cpu = True
    torch.manual_seed(0)
    ids = torch.randint(0, 1024, (2, 16))
    if eval_first:
        base.eval()
        with torch.no_grad():
            base(input_ids=ids)
    model = attach_lora(base, r=4, lora_alpha=8, target_modules=TARGETS, seed=0)
    with torch.no_grad():  # B = 0 at init would make lora_A's gradient zero
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn_like(param) * 0.1)
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_eval_then_train_gives_the_same_gradients_as_train_alone(tiny_model_dir):
    reference = lora_grads(tiny_model_dir, eval_first=False, patch=True)
    after_eval = lora_grads(tiny_model_dir, eval_first=True, patch=True)

    assert reference.keys() == after_eval.keys() and len(reference) == 2 * 2 * len(TARGETS)
    for name, grad in reference.items():
        torch.testing.assert_close(after_eval[name], grad, rtol=1e-3, atol=1e-5, msg=name)


@pytest.mark.skipif(not cpu_supports_bf16(), reason="the repack bug needs an AVX512-BF16 CPU")
def test_without_the_fix_eval_then_train_gradients_are_wrong(tiny_model_dir):
    reference = lora_grads(tiny_model_dir, eval_first=False, patch=True)
    broken = lora_grads(tiny_model_dir, eval_first=True, patch=False)

    worst = max(float((broken[n] - g).norm() / g.norm()) for n, g in reference.items()
                if n in broken and g.norm() > 0)
    missing = set(reference) - set(broken)
    assert missing or worst > 1e-2
