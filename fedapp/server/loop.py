"""The server's round loop: Flower's `Strategy.start`, plus what a long federated run needs.

`Strategy.start` always counts rounds from 1 and cannot stop a round that got too few
replies. This loop runs rounds `first_round..num_rounds` (so a resumed run continues where it
stopped, with the same round numbers and therefore the same seeds), retries a round that got
fewer than `min_replies` valid replies (first restoring the strategy's state, so the
discarded attempt counts for nothing: not in FLoRA's global factors, not in a bandit),
stops with a clear message if retries run
out, and calls `after_round` once a round is complete (evaluation, metrics, checkpoint).
"""

from __future__ import annotations

from collections.abc import Callable
from logging import INFO, WARNING

from flwr.app import ArrayRecord, ConfigRecord
from flwr.common.logger import log
from flwr.serverapp import Grid

from strategies.base import LoraStrategy
from strategies.messaging import send_and_receive


class TooFewReplies(RuntimeError):
    """A round kept getting fewer valid replies than the configured minimum."""


def run_rounds(strategy: LoraStrategy, grid: Grid, arrays: ArrayRecord, first_round: int,
               num_rounds: int, timeout: float, min_replies: int, retries: int,
               after_round: Callable[[int, ArrayRecord], None]) -> ArrayRecord:
    """Run rounds `first_round..num_rounds`; return the final global arrays."""
    for server_round in range(first_round, num_rounds + 1):
        for attempt in range(retries + 1):
            log(INFO, "")
            log(INFO, "[ROUND %s/%s]%s", server_round, num_rounds,
                f" retry {attempt}/{retries}" if attempt else "")
            before = strategy.state_dict()  # a discarded attempt must leave no trace
            messages = strategy.configure_train(server_round, arrays, ConfigRecord(), grid)
            replies = send_and_receive(grid, messages, timeout)
            new_arrays, _ = strategy.aggregate_train(server_round, replies)
            accepted = strategy.round_log[server_round].accepted
            if new_arrays is not None and accepted >= min_replies:
                arrays = new_arrays
                strategy.round_log[server_round].attempts = attempt + 1
                break
            log(WARNING, "Round %d: %d valid replies, scenario.min_replies=%d", server_round,
                accepted, min_replies)
            strategy.load_state(before, arrays)
        else:
            raise TooFewReplies(
                f"round {server_round}: fewer than scenario.min_replies={min_replies} valid "
                f"replies in {retries + 1} attempt(s); see the rejections in the log. The run "
                f"stopped; resume it with resume=<run dir> once enough clients are back")
        after_round(server_round, arrays)
    return arrays
