"""A tiny Llama and tokenizer built from a config, for fast tests (never for real runs)."""

from __future__ import annotations

from pathlib import Path

import torch

from fedapp.llm.data import DataSpec, load_records


def build_tiny_model(out_dir: Path, seed: int = 0) -> Path:
    """Write a ≈200k-parameter Llama (2 layers, 4 heads, 2 KV heads) and a BPE tokenizer
    trained on the default dataset into `out_dir`; `from_pretrained(out_dir)` loads both."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out_dir.mkdir(parents=True, exist_ok=True)
    records = load_records(DataSpec())
    texts = [f"{r['q']} {r['a']}" for r in records]
    bpe = Tokenizer(models.BPE(unk_token=None))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1024, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>",
                                        pad_token="<|endoftext|>")
    tokenizer.save_pretrained(out_dir)
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=1024, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, eos_token_id=0, pad_token_id=0,
                         bos_token_id=0, tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(out_dir)
    return out_dir


if __name__ == "__main__":
    import sys

    print(build_tiny_model(Path(sys.argv[1])))
