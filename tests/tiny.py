"""Tiny causal LMs and tokenizers built from a config, for fast tests (never for real runs).

One per model family the app is tested with, each with its family's tokenizer conventions:
- llama: SmolLM2-like, no BOS in its encoding, no chat template (Alpaca fallback);
- gemma3: Gemma-3 text model (tied embeddings, q/k norms, sliding-window layers), a BOS
  that its encoding adds, no chat template (as the checkpoint tried in issue 17);
- qwen2: biases on q/k/v, no BOS, a ChatML chat template.
"""

from __future__ import annotations

from pathlib import Path

import torch

from fedapp.llm.data import DataSpec, load_records

FAMILIES = ("llama", "gemma3", "qwen2")
VOCAB = 1024
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _tokenizer(family: str):
    """A byte-level BPE trained on the default dataset with the family's special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    records = load_records(DataSpec())
    texts = [f"{r['q']} {r['a']}" for r in records]
    specials = {"llama": ["<|endoftext|>"], "gemma3": ["<pad>", "<eos>", "<bos>"],
                "qwen2": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]}[family]
    bpe = Tokenizer(models.BPE(unk_token=None))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(texts, trainer)
    if family == "gemma3":  # Gemma's encoding starts every text with <bos>
        bpe.post_processor = processors.TemplateProcessing(
            single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[
                ("<bos>", bpe.token_to_id("<bos>"))])
        return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<bos>",
                                       eos_token="<eos>", pad_token="<pad>")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=specials[0],
                                        pad_token=specials[0])
    if family == "qwen2":
        tokenizer.chat_template = CHATML
    return tokenizer


def _config(family: str, tokenizer, layers: int = 2):
    from transformers import Gemma3TextConfig, LlamaConfig, Qwen2Config

    ids = {"eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id,
           "bos_token_id": tokenizer.bos_token_id if tokenizer.bos_token_id is not None
           else tokenizer.eos_token_id}
    shape = {"vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 128,
             "num_hidden_layers": layers, "num_attention_heads": 4, "num_key_value_heads": 2,
             "max_position_embeddings": 256, "tie_word_embeddings": True, **ids}
    if family == "gemma3":
        return Gemma3TextConfig(**shape, head_dim=16, query_pre_attn_scalar=16,
                                sliding_window=32, layer_types=(
                                    ["sliding_attention", "full_attention"] * layers)[:layers])
    if family == "qwen2":
        return Qwen2Config(**shape)
    return LlamaConfig(**shape)


def build_tiny_model(out_dir: Path, seed: int = 0, family: str = "llama",
                     layers: int = 2) -> Path:
    """Write a ≈200k-parameter model of `family` (`layers` layers, 4 heads, 2 KV heads) and
    its tokenizer into `out_dir`; `from_pretrained(out_dir)` loads both."""
    from transformers import AutoModelForCausalLM

    if family not in FAMILIES:
        raise ValueError(f"family={family!r}; allowed: {list(FAMILIES)}")
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = _tokenizer(family)
    tokenizer.save_pretrained(out_dir)
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(_config(family, tokenizer, layers)).save_pretrained(out_dir)
    return out_dir


if __name__ == "__main__":
    import sys

    print(build_tiny_model(Path(sys.argv[1]), family=sys.argv[2] if len(sys.argv) > 2
                           else "llama"))
