"""Tests of the data pipeline (fedapp/llm/data.py): held-out split, partitioners, local files,
tokenisation. Uses the packaged default dataset (503 records, 39 categories)."""

from __future__ import annotations

import csv
import json
import math
from collections import Counter

import pytest

from fedapp.llm.data import (
    IGNORE_INDEX,
    DataSpec,
    collate,
    format_example,
    load_partition,
    load_records,
    load_split,
    make_partitioner,
    tokenize_records,
)
from strategies.protocol import RunSetup

NUM_RECORDS = 503
NUM_CATEGORIES = 39
NUM_TEST = math.ceil(0.1 * NUM_RECORDS)  # datasets rounds a fractional test size up: 51
COLUMNS = ["id", "category", "q", "a", "sources", "related_service"]


@pytest.fixture
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


ALPACA = [
    {"instruction": "Name the capital of Aragon.", "input": "", "output": "Zaragoza."},
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
    {"instruction": "Translate to Swedish.", "input": "building permit", "output": "bygglov"},
]


def setup_of(partitioner: str, alpha: float = 0.0, data: DataSpec | None = None) -> RunSetup:
    """A run setup that differs only in how the data is split."""
    return RunSetup(model_path="unused", quantization="none", target_modules=("q_proj",),
                    lr=1e-3, batch_size=1, max_length=8, partitioner=partitioner,
                    partitioner_alpha=alpha, data=data or DataSpec())


def alpaca_spec(path) -> DataSpec:
    return DataSpec(path=str(path), instruction_column="instruction", input_column="input",
                    response_column="output", label_column="")


# ---------------------------------------------------------------------------------------
# Held-out split


def test_default_dataset_records_and_columns():
    # Execute
    records = load_records(DataSpec())

    # Assert
    assert len(records) == NUM_RECORDS
    assert records.column_names == COLUMNS
    assert len(set(records["category"])) == NUM_CATEGORIES
    assert len(set(records["id"])) == NUM_RECORDS  # ids identify records in the tests below


def test_test_split_is_held_out_and_reproducible():
    # Prepare
    spec = DataSpec()

    # Execute
    train, test = load_split(spec)
    _, test_again = load_split.__wrapped__(spec)  # bypass the cache: really split again
    _, test_other_seed = load_split(DataSpec(seed=1))

    # Assert
    assert len(test) == NUM_TEST
    assert len(train) + len(test) == NUM_RECORDS
    assert set(train["id"]).isdisjoint(test["id"])
    assert list(test_again["id"]) == list(test["id"])
    assert set(test_other_seed["id"]) != set(test["id"])
    assert load_split(spec) is load_split(DataSpec())  # equal frozen specs share the cache


def test_bad_test_fraction_is_refused():
    # Execute / Assert
    with pytest.raises(ValueError, match="dataset.test_fraction=1.0; allowed: 0 < x < 1"):
        load_split(DataSpec(test_fraction=1.0))


# ---------------------------------------------------------------------------------------
# Partitioners


@pytest.mark.parametrize("partitioner", ["iid", "dirichlet", "natural"])
def test_partitions_cover_the_train_split_exactly(partitioner):
    # Prepare
    spec = DataSpec()
    train, test = load_split(spec)

    # Execute
    parts = [load_partition(setup_of(partitioner, 0.5, spec), 4, i) for i in range(4)]

    # Assert
    ids = [set(p["id"]) for p in parts]
    assert all(len(p) > 0 for p in parts)
    assert sum(len(p) for p in parts) == len(train)  # no duplicates across or within
    assert set().union(*ids) == set(train["id"])
    assert all(i.isdisjoint(test["id"]) for i in ids)
    for i in range(4):
        for j in range(i + 1, 4):
            assert ids[i].isdisjoint(ids[j])


def test_natural_partitions_do_not_share_categories():
    # Prepare
    spec = DataSpec()
    train, _ = load_split(spec)
    assert len(set(train["category"])) == NUM_CATEGORIES

    # Execute
    parts = [load_partition(setup_of("natural", data=spec), 4, i) for i in range(4)]

    # Assert: groups of ceil(39 / 4) = 10 categories, the last one 9
    categories = [set(p["category"]) for p in parts]
    assert sorted(len(c) for c in categories) == [9, 10, 10, 10]
    assert sum(len(c) for c in categories) == NUM_CATEGORIES
    assert set().union(*categories) == set(train["category"])


def mean_max_category_share(alpha: float) -> float:
    parts = [load_partition(setup_of("dirichlet", alpha), 4, i) for i in range(4)]
    return sum(max(Counter(p["category"]).values()) / len(p) for p in parts) / len(parts)


def test_dirichlet_small_alpha_is_more_skewed():
    # Execute
    skewed = mean_max_category_share(0.05)
    even = mean_max_category_share(100.0)

    # Assert: with 39 categories an even split has a largest share near 30/452 ≈ 0.07
    assert skewed > 1.5 * even


def test_partitions_are_reproducible():
    # Execute
    first = list(load_partition(setup_of("dirichlet", 0.5), 4, 2)["id"])
    second = list(load_partition(setup_of("dirichlet", 0.5), 4, 2)["id"])

    # Assert
    assert first == second


# ---------------------------------------------------------------------------------------
# Bad input


def test_unknown_partitioner_lists_the_allowed_names():
    # Execute / Assert: the run setup refuses it, before any partitioner is made
    with pytest.raises(ValueError,
                       match=r"partitioner.name='nope'; allowed: \['iid', 'dirichlet', 'natural'\]"):
        setup_of("nope", 0.5)


@pytest.mark.parametrize("name", ["dirichlet", "natural"])
def test_label_partitioners_need_a_label_column(name):
    # Execute / Assert
    with pytest.raises(ValueError, match=rf"dataset.label_column=''; allowed: a column name "
                                         rf"\(partitioner.name='{name}'"):
        setup_of(name, 0.5, DataSpec(label_column=""))


def test_dirichlet_refuses_non_positive_alpha():
    # Execute / Assert
    with pytest.raises(ValueError, match=r"partitioner.alpha=0.0; allowed: > 0"):
        setup_of("dirichlet", 0.0)


def test_natural_refuses_more_partitions_than_categories():
    # Execute / Assert
    with pytest.raises(ValueError, match=f"cannot split {NUM_CATEGORIES} labels into 40 groups"):
        load_partition(setup_of("natural"), NUM_CATEGORIES + 1, 0)


def test_natural_refuses_label_groups_that_leave_a_client_empty():
    # Execute / Assert: groups of ceil(9 / 4) = 3 labels make 3 groups, not 4
    with pytest.raises(ValueError, match="cannot split 9 labels into 4 groups"):
        make_partitioner(setup_of("natural"), 4, 9)


def test_more_partitions_than_training_examples_is_refused():
    # Prepare
    too_many = NUM_RECORDS - NUM_TEST + 1

    # Execute / Assert
    with pytest.raises(ValueError, match=f"num_clients={too_many} but only {too_many - 1} training examples"):
        load_partition(setup_of("iid"), too_many, 0)


@pytest.mark.parametrize("partition_id", [-1, 4])
def test_partition_id_out_of_range_is_refused(partition_id):
    # Execute / Assert
    with pytest.raises(ValueError, match=rf"partition-id={partition_id} outside 0..3"):
        load_partition(setup_of("iid"), 4, partition_id)


def test_missing_column_is_named_with_the_real_columns():
    # Execute / Assert
    with pytest.raises(ValueError) as err:
        load_records(DataSpec(response_column="nope"))
    assert "dataset.response_column='nope' is not a column" in str(err.value)
    assert str(COLUMNS) in str(err.value)


def test_nonexistent_local_file_is_refused(tmp_path):
    # Prepare
    path = tmp_path / "absent.jsonl"

    # Execute / Assert
    with pytest.raises(ValueError, match="no such file"):
        load_records(alpaca_spec(path))


def test_local_file_with_unknown_suffix_is_refused(tmp_path):
    # Prepare
    path = tmp_path / "data.txt"
    path.write_text("instruction\tinput\toutput\n")

    # Execute / Assert
    with pytest.raises(ValueError, match=r"has suffix '.txt'; allowed: \['.csv', '.json'"):
        load_records(alpaca_spec(path))


# ---------------------------------------------------------------------------------------
# Local files


def write_jsonl(path) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in ALPACA))


def write_csv(path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["instruction", "input", "output"])
        writer.writeheader()
        writer.writerows(ALPACA)


@pytest.mark.parametrize("name, write", [("alpaca.jsonl", write_jsonl), ("alpaca.csv", write_csv)])
def test_local_alpaca_file_loads(tmp_path, name, write):
    # Prepare
    path = tmp_path / name
    write(path)

    # Execute
    records = load_records(alpaca_spec(path))

    # Assert
    assert len(records) == len(ALPACA)
    assert list(records["instruction"]) == [r["instruction"] for r in ALPACA]
    assert list(records["output"]) == [r["output"] for r in ALPACA]
    assert [bool(v) for v in records["input"]] == [False, True, True]
    assert list(records["input"])[1:] == ["2 and 3", "building permit"]


def test_local_file_partitions_iid(tmp_path):
    # Prepare: 20 records, 2 held out
    path = tmp_path / "many.jsonl"
    path.write_text("".join(json.dumps({"instruction": f"q{i}", "input": "", "output": f"a{i}"})
                            + "\n" for i in range(20)))
    spec = alpaca_spec(path)

    # Execute
    train, test = load_split(spec)
    parts = [load_partition(setup_of("iid", data=spec), 3, i) for i in range(3)]

    # Assert
    assert (len(train), len(test)) == (18, 2)
    assert sorted(q for p in parts for q in p["instruction"]) == sorted(train["instruction"])


# ---------------------------------------------------------------------------------------
# Tokenisation


def prompt_length(example: dict) -> int:
    """Length of the ignored prefix; asserts the ignored labels are exactly a prefix."""
    n = 0
    while n < len(example["labels"]) and example["labels"][n] == IGNORE_INDEX:
        n += 1
    assert IGNORE_INDEX not in example["labels"][n:]
    return n


def test_format_example_masks_exactly_the_prompt(tokenizer):
    # Prepare
    assert not tokenizer.chat_template
    spec = DataSpec()
    record = {"q": "What is a bygglov?", "a": "A building permit.", "category": "bygglov"}

    # Execute
    example = format_example(record, spec, tokenizer, max_length=512)

    # Assert: the ignored tokens decode to the Alpaca prompt, the rest to the response + eos
    ids, labels = example["input_ids"], example["labels"]
    n = prompt_length(example)
    assert len(ids) == len(labels)
    assert tokenizer.decode(ids[:n]) == "### Instruction:\nWhat is a bygglov?\n\n### Response:\n"
    assert labels[n:] == ids[n:]
    assert ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(ids[n:-1]) == "A building permit."


def test_format_example_appends_the_input_column(tmp_path, tokenizer):
    # Prepare
    spec = alpaca_spec(tmp_path / "unused.jsonl")

    # Execute
    with_input = format_example(ALPACA[1], spec, tokenizer, max_length=512)
    without_input = format_example(ALPACA[0], spec, tokenizer, max_length=512)

    # Assert
    n = prompt_length(with_input)
    assert tokenizer.decode(with_input["input_ids"][:n]) == (
        "### Instruction:\nAdd the numbers.\n\n2 and 3\n\n### Response:\n")
    m = prompt_length(without_input)
    assert tokenizer.decode(without_input["input_ids"][:m]) == (
        "### Instruction:\nName the capital of Aragon.\n\n### Response:\n")


def test_format_example_uses_the_chat_template_when_there_is_one(tokenizer):
    # Prepare
    tokenizer.chat_template = ("{% for m in messages %}<user>{{ m['content'] }}</user>{% endfor %}"
                               "{% if add_generation_prompt %}<assistant>{% endif %}")
    record = {"q": "Hello?", "a": "Hi."}

    # Execute
    example = format_example(record, DataSpec(), tokenizer, max_length=512)

    # Assert
    n = prompt_length(example)
    assert tokenizer.decode(example["input_ids"][:n]) == "<user>Hello?</user><assistant>"
    assert tokenizer.decode(example["input_ids"][n:-1]) == "Hi."


def test_format_example_truncates_ids_and_labels_together(tokenizer):
    # Prepare
    spec = DataSpec()
    record = load_records(spec)[0]
    full = format_example(record, spec, tokenizer, max_length=10_000)
    n = prompt_length(full)
    assert len(full["input_ids"]) > n + 5

    for max_length in (n - 3, n, n + 5):
        # Execute
        cut = format_example(record, spec, tokenizer, max_length=max_length)

        # Assert
        assert len(cut["input_ids"]) == len(cut["labels"]) == max_length
        assert cut["input_ids"] == full["input_ids"][:max_length]
        assert cut["labels"] == full["labels"][:max_length]


def test_tokenize_records_drops_examples_without_response_tokens(tokenizer):
    # Prepare: the same prompt length for both records, only the second fits one answer token
    spec = DataSpec()
    records = [{"q": "Why?", "a": "Because."}, {"q": "Why?", "a": "Because."}]
    n = prompt_length(format_example(records[0], spec, tokenizer, max_length=512))

    # Execute
    dropped = tokenize_records(records, spec, tokenizer, max_length=n)
    kept = tokenize_records(records[:1], spec, tokenizer, max_length=n + 1)

    # Assert
    assert dropped == []
    assert len(kept) == 1 and kept[0]["labels"][-1] != IGNORE_INDEX


def test_collate_right_pads():
    # Prepare
    examples = [{"input_ids": [5, 6, 7], "labels": [IGNORE_INDEX, 6, 7]},
                {"input_ids": [8], "labels": [8]}]

    # Execute
    batch = collate(examples, pad_token_id=0)

    # Assert
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 6, 7], [8, IGNORE_INDEX, IGNORE_INDEX]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
