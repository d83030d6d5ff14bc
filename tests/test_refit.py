"""Least-squares refit of pruned blocks (`fedapp.pruning.refit`), on hand-made matrices and
on the tiny Llama (hidden 64, 2 layers, 2 KV groups of 2 query heads, head_dim 16, MLP 128)."""

from __future__ import annotations

import pytest
import torch

from fedapp.llm.adapters import attach_lora
from fedapp.llm.model import load_base
from fedapp.pruning.refit import joined, refit_columns
from fedapp.pruning.structure import dense_weight
from fedapp.pruning.surgery import PrunePlan, iterative_prune, prune_model, refit_plan

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def batches(n: int = 3) -> list[dict[str, torch.Tensor]]:
    """Right-padded batches of different widths, as `collate` makes them."""
    out = []
    for seed in range(n):
        gen = torch.Generator().manual_seed(seed)
        width = 10 + 3 * seed
        mask = torch.ones(2, width, dtype=torch.long)
        mask[1, width - 4:] = 0
        out.append({"input_ids": torch.randint(1, 1024, (2, width), generator=gen) * mask,
                    "attention_mask": mask})
    return out


def test_refit_matches_least_squares_oracle():
    gen = torch.Generator().manual_seed(0)
    weight, x = torch.randn(5, 8, generator=gen), torch.randn(8, 200, generator=gen)
    x[3] = 0.9 * x[1] + 0.1 * x[3]  # a removed input mostly explained by a kept one
    keep = torch.tensor([0, 1, 2, 4, 6])
    fitted = refit_columns(weight, x @ x.T, keep, damp=1e-9)
    oracle = torch.linalg.lstsq(x[keep].T.double(), (weight @ x).T.double()).solution.T
    torch.testing.assert_close(fitted.double(), oracle, atol=1e-5, rtol=1e-5)
    residual = ((weight @ x - fitted @ x[keep]) ** 2).sum()
    assert residual < ((weight @ x - weight[:, keep] @ x[keep]) ** 2).sum()


def test_refit_keeps_weights_when_removed_inputs_are_silent():
    """Inputs that are always zero contribute nothing: the fit is the plain slice (up to
    the ridge's shrinkage, damp · mean diagonal)."""
    gen = torch.Generator().manual_seed(1)
    weight, x = torch.randn(4, 6, generator=gen), torch.randn(6, 500, generator=gen)
    x[[2, 5]] = 0
    keep = torch.tensor([0, 1, 3, 4])
    torch.testing.assert_close(refit_columns(weight, x @ x.T, keep, damp=1e-9),
                               weight[:, keep], atol=1e-5, rtol=1e-5)


def test_refit_rejects_bad_shapes_and_damping():
    with pytest.raises(ValueError, match=r"allowed: weight \(out, in\) with gram \(in, in\)"):
        refit_columns(torch.zeros(3, 4), torch.eye(5), torch.tensor([0]))
    with pytest.raises(ValueError, match="damp=0; allowed: > 0"):
        refit_columns(torch.zeros(3, 4), torch.eye(4), torch.tensor([0]), damp=0)


def test_joined_pads_to_the_widest_and_masks_the_padding():
    parts = batches()
    one = joined(parts)
    assert one["input_ids"].shape == (6, 16) and one["attention_mask"].shape == (6, 16)
    assert int(one["attention_mask"].sum()) == sum(int(b["attention_mask"].sum()) for b in parts)
    assert one["attention_mask"][0, 10:].sum() == 0 and one["input_ids"][0, 10:].sum() == 0


def captured_inputs(model, module, parts) -> torch.Tensor:
    """The unpadded tokens' inputs (n, in) of `module` over `parts`, one batch at a time."""
    seen = []

    def keep(_m, args):
        seen.append(args[0].detach().reshape(-1, args[0].shape[-1]))

    handle = module.register_forward_pre_hook(keep)
    with torch.no_grad():
        for b in parts:
            model(**b)
    handle.remove()
    return torch.cat([x[b["attention_mask"].reshape(-1).bool()] for x, b in zip(seen, parts)])


def test_refit_fits_the_output_linears_on_the_unpruned_inputs(tiny_model_dir):
    """Plain Linears (quantization none): the refitted o_proj / down_proj are the oracle
    least-squares fits on inputs captured batch by batch, and the pruned layers' outputs on
    those inputs are closer to the unpruned ones than plain slicing leaves them."""
    base = load_base(str(tiny_model_dir), "none", "cpu").eval()
    parts, layer = batches(), base.model.layers[1]
    plan = PrunePlan(kv_groups={1: [0]}, channels={1: list(range(0, 128, 2))})
    x_mlp = captured_inputs(base, layer.mlp.down_proj, parts)  # (n, 128)
    x_attn = captured_inputs(base, layer.self_attn.o_proj, parts)  # (n, 64)
    w_mlp, w_attn = dense_weight(layer.mlp.down_proj), dense_weight(layer.self_attn.o_proj)
    refits = refit_plan(base, plan, parts)
    assert set(refits) == {"model.layers.1.self_attn.o_proj", "model.layers.1.mlp.down_proj"}
    keep_mlp, keep_attn = torch.arange(1, 128, 2), torch.arange(32, 64)
    for name, w, x, keep in (("mlp.down_proj", w_mlp, x_mlp, keep_mlp),
                             ("self_attn.o_proj", w_attn, x_attn, keep_attn)):
        oracle = refit_columns(w, x.T.double() @ x.double(), keep)
        torch.testing.assert_close(refits[f"model.layers.1.{name}"], oracle, atol=1e-4, rtol=1e-4)
    prune_model(base, plan, refits)
    for module, w, x, keep, name in (
            (layer.mlp.down_proj, w_mlp, x_mlp, keep_mlp, "mlp.down_proj"),
            (layer.self_attn.o_proj, w_attn, x_attn, keep_attn, "self_attn.o_proj")):
        assert torch.equal(module.weight, refits[f"model.layers.1.{name}"])  # plain: as fitted
        with torch.no_grad():
            refitted = ((module(x[:, keep]) - x @ w.T) ** 2).sum()
        assert refitted < ((x[:, keep] @ w[:, keep].T - x @ w.T) ** 2).sum()
    # the rows sliced with them (q/k/v, gate/up) are the plain slices
    assert layer.mlp.up_proj.weight.shape == (64, 64)
    assert layer.self_attn.k_proj.weight.shape == (16, 64)


@pytest.mark.parametrize("quant", ["nf4", "none"])
def test_iterative_prune_with_refit_leaves_the_calibration_loss_lower(tiny_model_dir, quant):
    """Same plan (fisher on the same batches), with and without the refit: the refitted model's
    loss on the calibration tokens is lower, with the same shapes and LoRA still attached."""
    parts = [dict(b, labels=b["input_ids"].masked_fill(b["attention_mask"] == 0, -100))
             for b in batches()]
    losses, shapes = {}, {}
    for refit in (False, True):
        base = load_base(str(tiny_model_dir), quant, "cpu")
        model = attach_lora(base, r=4, lora_alpha=8, target_modules=TARGETS, seed=0)
        iterative_prune(model, 0.5, 1, lambda _m: None, "fisher", batches=parts,
                        refit=refit)
        model.eval()
        with torch.no_grad():
            losses[refit] = sum(float(model(**b).loss) for b in parts)
        shapes[refit] = {n: tuple(p.shape) for n, p in model.named_parameters()}
    assert shapes[True] == shapes[False]
    assert sum("lora_A" in n for n in shapes[True]) == 2 * len(TARGETS)  # 2 layers, still on
    assert losses[True] < losses[False]


def test_refit_without_batches_is_refused(tiny_model_dir):
    base = load_base(str(tiny_model_dir), "none", "cpu")
    with pytest.raises(ValueError, match="refit=True needs calibration batches"):
        iterative_prune(base, 0.5, 1, lambda _m: None, "magnitude", refit=True)


def test_a_refit_of_the_wrong_width_is_refused(tiny_model_dir):
    base = load_base(str(tiny_model_dir), "none", "cpu")
    plan = PrunePlan(channels={0: [0, 1]})
    with pytest.raises(ValueError, match=r"refit weight \(64, 128\); allowed: .* \(64, 126\)"):
        prune_model(base, plan, {"model.layers.0.mlp.down_proj": torch.zeros(64, 128)})
