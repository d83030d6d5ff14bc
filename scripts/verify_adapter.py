"""Reload a run's exported adapter with plain peft and recompute its held-out loss.

    .venv/bin/python scripts/verify_adapter.py runs/<timestamp>

Prints the loss the server reported for the last round, the loss of
`PeftModel.from_pretrained(base, <run>/adapter)` on the same held-out examples, and their
relative difference; exits 1 if they differ by more than 1 %.
"""

from __future__ import annotations

import sys
from pathlib import Path

from omegaconf import OmegaConf
from peft import PeftModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedapp.config import data_spec
from fedapp.llm.model import load_base, load_tokenizer
from fedapp.llm.train import eval_loss
from fedapp.server.evaluate import heldout_examples
from fedapp.server.report import read_metrics


def main(run_dir: Path) -> int:
    cfg = OmegaConf.load(run_dir / "config.yaml")
    reported = read_metrics(run_dir / "metrics.jsonl")[-1]["eval-loss"]
    tokenizer = load_tokenizer(cfg.model.path)
    examples = heldout_examples(data_spec(cfg), tokenizer, cfg.train.max_length,
                                cfg.eval.max_examples)
    model = PeftModel.from_pretrained(load_base(cfg.model.path, cfg.model.quantization),
                                      run_dir / "adapter")
    loss = eval_loss(model, examples, cfg.eval.batch_size, tokenizer.pad_token_id)
    gap = abs(loss - reported) / reported
    print(f"server-reported held-out loss {reported:.5f}; plain peft reload {loss:.5f}; "
          f"relative difference {gap:.2e}")
    return 0 if gap <= 0.01 else 1


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
