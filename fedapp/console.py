"""A console a person can read: the third-party notices this app has checked and found
harmless here, configured away in one place.

`configure_console()` runs when the `fedapp` package is first imported (`fedapp/__init__.py`),
so the ServerApp, every ClientApp process or Ray actor, and the tools get it before they
import bitsandbytes or transformers. Every entry names one message, one logger or one
library's progress bars, and why: no warning category or library is silenced wholesale, so
real warnings and errors still show.

What is not configured here (it happens before any app code runs) is fixed at its cause or
at the edge: Ray's accelerator notice by `RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO=0` in the
environment of `flwr` (`fedapp.tools.submit.flower_env`, `scripts/flwr_env.sh`); flwr's
fixed federation-size notice by `stale_notice` in the log stream of `fedapp.tools.submit`.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

# bitsandbytes (>= 0.50) on AVX512-BF16 CPUs tries, at import, to fetch a faster CPU kernel
# from the Hugging Face Hub through the `kernels` package and logs this when it cannot. We
# do not install `kernels` (it downloads code from a hub at run time); bnb's own kernel runs.
BNB_LOGGER = "bitsandbytes.backends.cpu.ops"
BNB_KERNELS_MESSAGE = "Failed to load CPU gemm_4bit_forward from kernels-community"
# flwr's simulation ends every Ray actor this way, also after a run that completed: it is
# how actors stop, logged as a WARNING on the last line of every run.
ACTOR_END_MESSAGE = "Manually terminating ClientAppActor"

# {logger: start of the one message dropped from it}
LOGGED_NOTICES = {BNB_LOGGER: BNB_KERNELS_MESSAGE, "flwr": ACTOR_END_MESSAGE}

# (message regex, category, module regex) of warnings raised inside libraries, not by us:
WARNINGS = (
    # torch's own torch/utils/mkldnn.py uses torch.jit.script_method when bitsandbytes'
    # torch.compile decorator imports inductor. Python hides DeprecationWarnings by default,
    # but flwr's Ray transport turns them all on ("once") in the simulation processes.
    (r"`torch\.jit\.script_method` is deprecated", DeprecationWarning, r"torch\.jit\._script"),
    # peft 0.21 probes `model.is_gradient_checkpointing`, an alias transformers 5 deprecated.
    (r"`is_gradient_checkpointing` is deprecated", FutureWarning, r"transformers\.modeling_utils"),
)

# Per-file and per-call progress bars (transformers' "Loading weights", datasets' "Generating
# train split" / "Flattening the indices") repeat in every client at every load and are
# unreadable interleaved through Ray. A user's own setting of these switches wins (0: bars).
HUB_BARS = "HF_HUB_DISABLE_PROGRESS_BARS"  # huggingface_hub's, read by transformers too
DATASETS_BARS = "HF_DATASETS_DISABLE_PROGRESS_BARS"

# Lines of the streamed run log that flwr 1.41 prints for every simulation whatever its
# configuration: a changed default (we always pass num-supernodes) and how to change it.
STALE_NOTICES = (
    "Since flwr 1.32, default simulated SuperNodes changed from 10 to 2.",
    "To change federation size, use the following command:",
    "flwr federation simulation-config ",
)


class DropMessage(logging.Filter):
    """Drops one logger's records whose message starts with `prefix`, and nothing else."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


def configure_console() -> None:
    """Apply the configuration above to this process (idempotent)."""
    for name, prefix in LOGGED_NOTICES.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, DropMessage) for f in logger.filters):
            logger.addFilter(DropMessage(prefix))
    for message, category, module in WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
    quiet_progress_bars()


def quiet_progress_bars() -> None:
    """Progress bars off unless the user set the switches. The libraries read them at
    import, so one imported already is told directly."""
    for switch in (HUB_BARS, DATASETS_BARS):
        os.environ.setdefault(switch, "1")
    modules = sys.modules
    if os.environ[HUB_BARS] == "1":
        if "huggingface_hub.utils" in modules:
            modules["huggingface_hub.utils"].disable_progress_bars()
        if "transformers.utils.logging" in modules:
            modules["transformers.utils.logging"].disable_progress_bar()
    if os.environ[DATASETS_BARS] == "1" and "datasets.utils" in modules:
        modules["datasets.utils"].disable_progress_bars()


def stale_notice(line: str) -> bool:
    """Whether a line of a streamed run log is one of flwr's `STALE_NOTICES`."""
    return any(notice in line for notice in STALE_NOTICES)
