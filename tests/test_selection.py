"""Client-side data selection (`train.selection`): refused by key before training, SHED on a
tiny model (the right count, the same subset in a fresh process), its logit-layer
gradients against autograd, and a real `flwr run`."""

from __future__ import annotations

import pytest
import torch

from fedapp.client import selection
from fedapp.client.partition import partition_examples
from fedapp.client.round import local_data
from fedapp.client.selection import (
    head_gradient_alignment,
    selected_examples,
    selection_metrics,
)
from fedapp.config import compose_config, run_setup
from fedapp.llm.data import IGNORE_INDEX, collate
from fedapp.llm.loss import causal_lm
from fedapp.llm.model import cached_base
from fedapp.server.report import read_metrics
from fedapp.server_app import check_federation_fits_data
from strategies.protocol import RunSetup, TrainOrder
from strategies.shed_math import budget_count
from tests.test_e2e import flwr_env, submit  # noqa: F401  (flwr_env is a fixture)

SHED = "train.selection=shed train.selection_budget=0.25 train.selection_clusters=4"


@pytest.fixture
def tiny_setup(tiny_model_dir, tmp_path, monkeypatch):
    """A SHED run setup on the tiny model, with its own partition cache and fresh caches."""
    monkeypatch.setenv("FEDAPP_CACHE", str(tmp_path / "cache"))
    partition_examples.cache_clear()
    selection._selection.cache_clear()
    selection_metrics()  # nothing left over from another test
    return run_setup(compose_config(f"model.path={tiny_model_dir} {SHED}"))


@pytest.mark.parametrize(("override", "message"), [
    ("train.selection_budget=0", "train.selection_budget=0; allowed: a fraction 0 < x <= 1"),
    ("train.selection_budget=1.5", "train.selection_budget=1.5; allowed: a fraction"),
    ("train.selection_budget=-1", "train.selection_budget=-1; allowed: a fraction"),
    ("train.selection_budget=half", "train.selection_budget='half'; allowed: a fraction"),
    ("train.selection=best", "train.selection='best'; allowed: ['all', 'shed', 'random']"),
    ("train.selection_clusters=0", "train.selection_clusters=0; allowed: an int >= 1"),
    ("train.selection_permutations=2.5", "train.selection_permutations=2.5; allowed: an int"),
    ("strategy=fedbiot train.selection=shed", ("train.selection='shed'; allowed: 'all' or "
                                               "'random' with strategy=fedbiot")),
])
def test_bad_selection_values_are_refused_when_composed(override, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        compose_config(override)


def test_selection_values_reach_the_run_setup_and_survive_the_wire():
    # Execute
    setup = run_setup(compose_config("train.selection=random train.selection_budget=0.5 "
                                     "train.selection_clusters=3"))

    # Assert
    assert (setup.selection.method, setup.selection.budget, setup.selection.clusters) == (
        "random", 0.5, 3)
    assert RunSetup.from_dict(setup.to_dict()) == setup
    assert run_setup(compose_config("")).selection.method == "all"  # the default


def test_more_clusters_than_a_partition_holds_fails_on_the_server_first():
    # Prepare: the natural split of the FAQ over 4 clients: about 100 examples each
    cfg = compose_config("train.selection=shed train.selection_clusters=200")

    # Execute / Assert
    with pytest.raises(ValueError, match=r"train.selection_clusters=200; allowed: at most the "
                                         r"examples of the smallest partition"):
        check_federation_fits_data(cfg)
    check_federation_fits_data(compose_config("train.selection=random "
                                              "train.selection_clusters=200"))  # no clusters


def test_a_client_refuses_more_clusters_than_its_examples(tiny_model_dir, tiny_setup):
    # Prepare
    setup = run_setup(compose_config(f"model.path={tiny_model_dir} train.selection=shed "
                                     "train.selection_clusters=1000"))

    # Execute / Assert
    with pytest.raises(ValueError, match=r"train.selection_clusters=1000; allowed: at most"):
        selected_examples(setup, 4, 1)


def test_shed_keeps_its_budget_the_same_way_in_a_fresh_process(tiny_setup):
    # Prepare
    everything, _ = partition_examples(tiny_setup, 4, 1)
    saved = selection.selection_file(tiny_setup, 4, 1)

    # Execute
    kept, _ = selected_examples(tiny_setup, 4, 1)
    seconds = selection_metrics()["selection-seconds"]
    again, _ = selected_examples(tiny_setup, 4, 1)  # the process's copy: no cost
    cached_seconds = selection_metrics()["selection-seconds"]
    written = saved.exists()
    selection._selection.cache_clear()  # a fresh process on this machine: reads the file
    read_back, _ = selected_examples(tiny_setup, 4, 1)
    saved.unlink()
    selection._selection.cache_clear()  # a fresh machine: chooses again
    chosen_again, _ = selected_examples(tiny_setup, 4, 1)

    # Assert
    assert len(kept) == budget_count(len(everything), 0.25) < len(everything)
    assert all(k in everything for k in kept)
    assert seconds > 0 and cached_seconds == 0
    assert written and again == kept and read_back == kept and chosen_again == kept


def test_shed_random_and_all_keep_different_examples(tiny_model_dir, tiny_setup):
    # Prepare
    random_setup = run_setup(compose_config(f"model.path={tiny_model_dir} {SHED} "
                                            "train.selection=random"))
    order = TrainOrder(server_round=1, lora_r=4, lora_alpha=8.0, local_steps=1, seed=0)

    # Execute
    shed, _, _ = local_data(tiny_setup, order, 2, 4)
    drawn, _, _ = local_data(random_setup, order, 2, 4)
    everything, _, _ = local_data(run_setup(compose_config(f"model.path={tiny_model_dir}")),
                                  order, 2, 4)

    # Assert: the same budget, another choice; `all` is the partition as before
    assert len(shed) == len(drawn) == budget_count(len(everything), 0.25)
    assert shed != drawn
    assert everything == partition_examples(tiny_setup, 4, 2)[0]


def test_the_alignment_is_the_dot_product_of_autograd_head_gradients(tiny_model_dir):
    # Prepare: the tiny model's examples; the oracle differentiates the cross-entropy of
    # h @ Wᵀ with respect to a copy of the output weight W, by autograd
    setup = run_setup(compose_config(f"model.path={tiny_model_dir}"))
    examples, pad = partition_examples(setup, 4, 0)
    model = cached_base(str(tiny_model_dir), "nf4", "cpu")
    validation, players = examples[:3], examples[3:6]

    def head_gradient(batch_examples: list[dict]) -> torch.Tensor:
        batch = collate(batch_examples, pad)
        with torch.no_grad():
            hidden = causal_lm(model).get_decoder()(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"]).last_hidden_state[:, :-1]
        labels = batch["labels"][:, 1:]
        keep = labels != IGNORE_INDEX
        weight = model.get_output_embeddings().weight.detach().float().clone().requires_grad_()
        loss = torch.nn.functional.cross_entropy(hidden[keep].float() @ weight.T, labels[keep])
        loss.backward()
        return weight.grad

    g_val = head_gradient(validation)  # the mean over all validation tokens
    expected = torch.stack([(g_val * head_gradient([p])).sum() for p in players])

    # Execute
    alignment = head_gradient_alignment(model, validation, players, pad)

    # Assert
    torch.testing.assert_close(alignment, expected, rtol=1e-4, atol=1e-7)


@pytest.mark.slow
def test_flwr_run_trains_on_the_shed_selection(tiny_model_dir, tmp_path, flwr_env):  # noqa: F811
    overrides = (f"strategy=flora strategy.ranks=[2,4] model.path={tiny_model_dir} "
                 "scenario=two_clients num_rounds=2 train.local_steps=4 train.lr=0.01 "
                 "train.max_length=64 eval.max_examples=8 partitioner=iid "
                 "train.selection=shed train.selection_budget=0.5 train.selection_clusters=4")

    # Execute
    proc = submit(flwr_env, overrides, tmp_path / "run")

    # Assert: each client trained on half its partition, and paid for choosing it once
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    setup = run_setup(compose_config(overrides))
    wanted = {f"partition-{i}": budget_count(len(partition_examples(setup, 2, i)[0]), 0.5)
              for i in range(2)}
    for row in rows[1:]:
        assert {name: c["num-examples"] for name, c in row["clients"].items()} == wanted
    assert all(c["selection-seconds"] > 0 for c in rows[1]["clients"].values())
    assert rows[-1]["eval-loss"] < rows[0]["eval-loss"]
