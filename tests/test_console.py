"""The console stays readable: the third-party notices `fedapp.console` configures away do not
reappear when the client side loads a model, and a real warning still shows."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from logging import WARNING
from pathlib import Path

import pytest
from flwr.app import ArrayRecord, ConfigRecord
from flwr.common.logger import FLOWER_LOGGER, log

from fedapp.console import (
    ACTOR_END_MESSAGE,
    BNB_KERNELS_MESSAGE,
    BNB_LOGGER,
    DATASETS_BARS,
    HUB_BARS,
    DropMessage,
    stale_notice,
)
from strategies.flora import FLoRA
from strategies.summary import NO_REPLY, OK, ClientOutcome
from tests.test_strategies import (  # noqa: F401  (task_identity is an autouse fixture)
    MODULES,
    SETUP,
    FakeGrid,
    adapter,
    reply,
    task_identity,
)

ROOT = Path(__file__).resolve().parents[1]

# What a Ray actor does: flwr's Ray transport, imported first, shows every DeprecationWarning
# ("once"); then the client app is imported, and a round loads data, the 4-bit base, a LoRA.
CLIENT_SIDE = """
import sys
import flwr.simulation.ray_transport.utils
import fedapp.client_app
from fedapp.llm.adapters import with_lora
from fedapp.llm.data import DataSpec, load_records
from fedapp.llm.model import load_base
load_records(DataSpec())
with with_lora(load_base(sys.argv[1], "nf4", "cpu"), 4, 8, ["q_proj", "v_proj"], 0):
    pass
print("loaded")
"""

# The same loading without fedapp: what the console would show unconfigured.
UNCONFIGURED = """
import sys
import flwr.simulation.ray_transport.utils
import bitsandbytes
from bitsandbytes.functional import has_avx512bf16
from transformers import AutoModelForCausalLM
AutoModelForCausalLM.from_pretrained(sys.argv[1])
print("avx512bf16", has_avx512bf16())
"""

NOTICES = (BNB_KERNELS_MESSAGE, "Loading weights", "Writing model shards",
           "Generating train split", "torch.jit.script_method", "is_gradient_checkpointing")


def run_python(script: str, model_dir: Path, tmp_path: Path) -> str:
    """stdout + stderr of `script` in a fresh interpreter, with none of the progress-bar
    switches that importing fedapp in this test process has set."""
    env = {k: v for k, v in os.environ.items() if k not in (HUB_BARS, DATASETS_BARS)}
    env.update(FEDAPP_CACHE=str(tmp_path / "fedapp-cache"),
               HF_DATASETS_CACHE=str(tmp_path / "datasets-cache"))
    done = subprocess.run([sys.executable, "-c", script, str(model_dir)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout + done.stderr


def test_loading_on_the_client_side_prints_no_notice_and_no_progress_bar(tiny_model_dir, tmp_path):
    # Execute
    output = run_python(CLIENT_SIDE, tiny_model_dir, tmp_path)

    # Assert
    assert "loaded" in output
    assert [n for n in NOTICES if n in output] == []


def test_unconfigured_loading_prints_what_the_console_test_looks_for(tiny_model_dir, tmp_path):
    # Execute: proves the test above would see the notices if they came back
    output = run_python(UNCONFIGURED, tiny_model_dir, tmp_path)

    # Assert
    assert "Loading weights" in output
    if "avx512bf16 True" in output:  # bitsandbytes tries the `kernels` package only there
        assert BNB_KERNELS_MESSAGE in output
        assert "torch.jit.script_method" in output


@pytest.mark.parametrize(("logger_name", "notice"), [(BNB_LOGGER, BNB_KERNELS_MESSAGE),
                                                     ("flwr", ACTOR_END_MESSAGE)])
def test_a_logger_filter_drops_only_its_message(caplog, logger_name, notice):
    # Prepare
    logger = logging.getLogger(logger_name)

    # Execute
    with caplog.at_level(logging.WARNING, logger=logger_name):
        logger.warning("%s: No module named 'kernels'", notice)
        logger.warning("some other warning")

    # Assert
    assert any(isinstance(f, DropMessage) for f in logger.filters)
    assert [r.getMessage() for r in caplog.records] == ["some other warning"]


def test_flwrs_own_log_call_loses_the_actor_end_notice_only():
    # Prepare
    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())  # type: ignore[method-assign]
    FLOWER_LOGGER.addHandler(handler)

    # Execute: as flwr's VirtualClientEngineActor.terminate logs it
    try:
        log(WARNING, "Manually terminating %s", "ClientAppActor")
        log(WARNING, "Manually terminating %s", "SomethingElse")
    finally:
        FLOWER_LOGGER.removeHandler(handler)

    # Assert
    assert lines == ["Manually terminating SomethingElse"]


SUPERNODES_NOTICE = ("\x1b[93mWARNING \x1b[0m:   Since flwr 1.32, default simulated SuperNodes "
                     "changed from 10 to 2.\n")
RESIZE_HINT = ("INFO :      \tflwr federation simulation-config @none/default <superlink> "
               "--num-supernodes <N>\n")


@pytest.mark.parametrize(("line", "stale"), [
    (SUPERNODES_NOTICE, True),
    ("INFO :      To change federation size, use the following command:\n", True),
    (RESIZE_HINT, True),
    ("INFO :      Federation `@none/default` (4 simulated SuperNodes)\n", False),
    ("WARNING :   Round 2: rejected partition-1: client error\n", False),
])
def test_only_flwrs_stale_notices_leave_the_streamed_log(line, stale):
    assert stale_notice(line) is stale


# ---------------------------------------------------------------------------------------
# The per-round line of each client


def test_console_line_of_an_accepted_client_hand_computed():
    # Prepare: 12 steps in 30 s, 1.5 MiB down, 0.25 MiB up
    outcome = ClientOutcome(bytes_down=3 * 2**19, status=OK, bytes_up=2**18, r=8,
                            metrics={"train-loss": 2.34567, "train-seconds": 30.0,
                                     "peak-rss-mb": 2129.6})

    # Execute
    line = outcome.console_line("partition-1", 8, 12)

    # Assert
    assert line == ("partition-1: r=8, 12 steps, train-loss 2.3457, 2.50 s/step, "
                    "peak RSS 2130 MiB, down 1.500 MB, up 0.250 MB")
    for flag, said in ((1.0, "2130 MiB (jemalloc), down"), (0.0, "2130 MiB (system malloc)")):
        outcome.metrics["jemalloc"] = flag
        assert said in outcome.console_line("partition-1", 8, 12)


def test_console_line_of_a_pruning_client_times_its_tuning_steps():
    # Prepare: 40 s in all, of which 20 s tuning over 10 steps
    outcome = ClientOutcome(status=OK, metrics={"train-loss": 1.0, "train-seconds": 40.0,
                                                "tune-seconds": 20.0, "peak-rss-mb": 100.0})

    # Execute
    line = outcome.console_line("p", 4, 10)

    # Assert
    assert "2.00 s/step" in line


def test_console_line_of_a_client_without_reply_says_so():
    # Execute
    line = ClientOutcome(bytes_down=2**20).console_line("partition-3", 16, 12)

    # Assert
    assert line == f"partition-3: {NO_REPLY}, r=16, 12 steps, down 1.000 MB, up 0.000 MB"


def test_aggregate_train_logs_one_line_per_client_with_its_order():
    # Prepare: two clients of ranks 2 and 4 with 3 local steps; the rank-4 one never replies
    grid = FakeGrid({11: 0, 12: 1})
    strategy = FLoRA(SETUP, MODULES, local_steps=3, ranks=[2, 4], alpha_ratio=2.0)
    msgs = {m.content["config"]["lora-r"]: m
            for m in strategy.configure_train(1, ArrayRecord(), ConfigRecord(), grid)}
    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())  # type: ignore[method-assign]
    FLOWER_LOGGER.addHandler(handler)

    # Execute
    try:
        strategy.aggregate_train(1, [reply(msgs[2], adapter(2, 0), 5.0)])
    finally:
        FLOWER_LOGGER.removeHandler(handler)

    # Assert: test_strategies' replies report train-loss 1.0 and no timing
    clients = [line.strip() for line in lines if line.startswith("  partition-")]
    assert [c.split(", down")[0] for c in clients] == [
        "partition-0: r=2, 3 steps, train-loss 1.0000, - s/step, peak RSS - MiB",
        f"partition-1: {NO_REPLY}, r=4, 3 steps"]
