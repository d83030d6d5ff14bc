"""A client's partition is prepared once, with the rest of its split (in a helper process
when the client has not loaded `datasets`), then read from the cache: same examples as
tokenising directly."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from fedapp.client.partition import partition_examples, partition_file
from fedapp.config import compose_config, run_setup
from fedapp.llm.data import load_partition, tokenize_records
from fedapp.llm.model import load_tokenizer
from tests.conftest import ROOT


@pytest.fixture
def setup(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("FEDAPP_CACHE", str(tmp_path / "cache"))
    return run_setup(compose_config(f"model.path={tiny_model_dir}"))


def test_the_cached_partition_holds_the_tokenised_examples(setup):
    partition_examples.cache_clear()
    examples, pad = partition_examples(setup, 4, 1)
    tokenizer = load_tokenizer(setup.model_path)
    expected = tokenize_records(load_partition(setup, 4, 1), setup.data, tokenizer,
                                setup.max_length)
    assert examples == expected and pad == tokenizer.pad_token_id
    assert partition_file(setup, 4, 1).exists()
    assert partition_file(setup, 4, 2) != partition_file(setup, 4, 1)
    # one preparation wrote the whole split: a newly sampled client reads its file at once
    written = {i: partition_file(setup, 4, i).exists() for i in range(4)}
    assert written == {0: True, 1: True, 2: True, 3: True}
    partition_examples.cache_clear()
    assert partition_examples(setup, 4, 3)[0] == tokenize_records(
        load_partition(setup, 4, 3), setup.data, tokenizer, setup.max_length)
    other = run_setup(compose_config(f"model.path={setup.model_path} train.max_length=64"))
    assert partition_file(other, 4, 1) != partition_file(setup, 4, 1)


def test_a_client_without_datasets_prepares_in_a_helper_process(setup, tmp_path):
    code = (f"import json, sys; sys.path.insert(0, {str(ROOT)!r})\n"
            "from fedapp.client.partition import partition_examples\n"
            "from strategies.protocol import RunSetup\n"
            "setup = RunSetup.from_dict(json.loads(sys.argv[1]))\n"
            "examples, pad = partition_examples(setup, 2, 0)\n"
            "print(json.dumps([len(examples), pad, 'datasets' in sys.modules]))")
    out = subprocess.run([sys.executable, "-c", code, json.dumps(setup.to_dict())],
                         capture_output=True, text=True, check=True,
                         env={**os.environ, "FEDAPP_CACHE": str(tmp_path / "cache")})
    count, pad, imported = json.loads(out.stdout.strip().splitlines()[-1])
    assert count > 0 and not imported  # the client process never loaded datasets
    partition_examples.cache_clear()
    examples, pad_here = partition_examples(setup, 2, 0)  # read back from the same file
    assert (len(examples), pad_here) == (count, pad)


def test_a_bad_partition_fails_with_the_reason(setup):
    partition_examples.cache_clear()
    with pytest.raises(ValueError, match="partition-id=5 outside 0..3"):
        partition_examples(setup, 4, 5)
