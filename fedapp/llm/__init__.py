"""The language model: base loading in 4-bit (`model`), instruction data (`data`), LoRA
adapters (`adapters`) and training / evaluation steps (`train`)."""
