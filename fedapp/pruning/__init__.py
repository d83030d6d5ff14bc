"""Structured pruning of Llama-family models for FedSpine's clients: the unit layout
(`structure`), importance criteria (`importance`), and plans and surgery (`surgery`)."""
