"""The token embedding and the output head in 4 bits (`model.quantization=nf4-embeddings`).

bitsandbytes quantises the linear layers; the token embedding stays full precision, and a
model that ties it to its output head (SmolLM2, Gemma) uses that one matrix twice. For
SmolLM2-135M it is 49,152 × 576 fp32 = 108 MiB, more than all its 4-bit layers together
(scripts/bench_client.py, "weights"). Here it is stored once in NF4, the same 4-bit code and
block size as bitsandbytes' layers (16 levels, one fp32 absmax per 64 values: 14 MiB):

- the embedding looks up a token's packed row and decodes only the rows it needs;
- the output head decodes the vocabulary `BLOCK_ROWS` rows at a time, and the chunked loss
  (`fedapp.llm.loss`) takes those blocks one after another, so the fp32 matrix never
  exists whole.

The values change by the quantisation (NF4's ≈9 % weight error, as in every 4-bit layer);
`tests/test_embedding.py` pins the code against a plain dequantised matrix, and
`scripts/bench_client.py` measures the loss it costs and the memory it saves. Only a plain
`nn.Embedding` and a plain bias-free `nn.Linear` head are replaced (anything else, such as
Gemma's scaled embedding, is refused by name); the exported deployable model keeps the
stock layout (`fedapp.server.deployed` loads with plain `nf4`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

import torch
from torch import nn

from fedapp.llm.scratch import scratch

BLOCKSIZE = 64  # values per absmax, as bitsandbytes' 4-bit layers
BLOCK_ROWS = 1024  # vocabulary rows the head decodes at once: 2.25 MiB fp32 at hidden 576
QUANTISE_ROWS = 1024  # rows quantised at once while loading
NF4_LEVELS = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
              -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
              0.07958029955625534, 0.16093020141124725, 0.24611230194568634,
              0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
              0.7229568362236023, 1.0)  # QLoRA's NormalFloat4 levels (bnb's "nf4" code)


def quantise_rows(weight: torch.Tensor, code: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed uint8 (rows, cols/2): two 4-bit level indices per byte, the first in the high
    nibble; absmax fp32 (rows, cols/BLOCKSIZE)) of `weight`, each value rounded to the
    nearest level of `code` times its block's absmax."""
    rows, cols = weight.shape
    blocks = weight.float().reshape(rows, cols // BLOCKSIZE, BLOCKSIZE)
    absmax = blocks.abs().amax(-1).clamp(min=torch.finfo(torch.float32).tiny)
    scaled = (blocks / absmax[..., None]).reshape(rows, cols)
    index = torch.bucketize(scaled, (code[:-1] + code[1:]) / 2, out_int32=True).to(torch.uint8)
    return (index[:, 0::2] << 4) | index[:, 1::2], absmax


def byte_levels(code: torch.Tensor) -> torch.Tensor:
    """(256, 2) fp32: the two levels a packed byte stands for, high nibble first."""
    return torch.stack((code.repeat_interleave(len(code)), code.repeat(len(code))), 1)


def dequantise_rows(packed: torch.Tensor, absmax: torch.Tensor, pairs: torch.Tensor,
                    reuse: bool = False) -> torch.Tensor:
    """fp32 (..., cols) from `quantise_rows`' packed rows, their absmax and `byte_levels`;
    `reuse`: written into this thread's scratch buffers (`fedapp.llm.scratch`, slot
    "nf4-table"), valid until the next such call, never a fresh allocation."""
    if not reuse:
        values = pairs.index_select(0, packed.flatten().int())
        blocks = values.reshape(*packed.shape[:-1], -1, BLOCKSIZE)
        return (blocks * absmax[..., None]).flatten(-2)
    count = packed.numel()
    index = scratch(count, torch.int32, "nf4-table")
    index.copy_(packed.flatten())
    values = scratch(2 * count, torch.float32, "nf4-table").view(count, 2)
    torch.index_select(pairs, 0, index, out=values)
    blocks = values.view(*packed.shape[:-1], -1, BLOCKSIZE)
    return blocks.mul_(absmax[..., None]).flatten(-2)


RowReader = Callable[[int, int], torch.Tensor]  # (start, end) -> those rows of a matrix


class Nf4Table(nn.Module):
    """A (vocabulary × hidden) matrix held in NF4: rows decoded on demand. Quantised from
    `read(start, end)` `QUANTISE_ROWS` rows at a time, so that the full-precision matrix is
    never needed whole (`fedapp.llm.model` reads it from the checkpoint file)."""

    def __init__(self, shape: tuple[int, int], read: RowReader) -> None:
        super().__init__()
        rows, cols = shape
        if cols % BLOCKSIZE:
            raise ValueError(f"a 4-bit embedding needs a hidden size divisible by {BLOCKSIZE}; "
                             f"this model's is {cols}: use model.quantization=nf4")
        code = torch.tensor(NF4_LEVELS)
        parts = [quantise_rows(read(s, min(s + QUANTISE_ROWS, rows)).cpu(), code)
                 for s in range(0, rows, QUANTISE_ROWS)]
        self.register_buffer("pairs", byte_levels(code))
        self.register_buffer("packed", torch.cat([p for p, _ in parts]))
        self.register_buffer("absmax", torch.cat([a for _, a in parts]))
        self.shape = (rows, cols)

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        return dequantise_rows(self.packed[index], self.absmax[index], self.pairs)

    def blocks(self, size: int | None = None, reuse: bool = False
               ) -> Iterator[tuple[int, torch.Tensor]]:
        """(first row, its fp32 block) over the whole matrix, `size` (BLOCK_ROWS) rows at a
        time; `reuse`: every block decoded into the same scratch buffer, so a block is valid
        only until the next is taken (never for autograd, which would keep it)."""
        size = size or BLOCK_ROWS
        for start in range(0, self.shape[0], size):
            yield start, dequantise_rows(self.packed[start:start + size],
                                         self.absmax[start:start + size], self.pairs, reuse)


class Nf4Embedding(nn.Module):
    """Stands in for `nn.Embedding`: the rows of the token ids, decoded from NF4."""

    def __init__(self, table: Nf4Table, padding_idx: int | None) -> None:
        super().__init__()
        self.table, self.padding_idx = table, padding_idx
        self.num_embeddings, self.embedding_dim = table.shape

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.table.rows(input_ids)


class Nf4Head(nn.Module):
    """Stands in for a bias-free `nn.Linear` output head: logits block by block (the
    chunked loss reads `table.blocks()` itself and never calls this)."""

    def __init__(self, table: Nf4Table) -> None:
        super().__init__()
        self.table = table
        self.out_features, self.in_features = table.shape

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.cat([hidden @ w.to(hidden.dtype).T for _, w in self.table.blocks()], -1)


def tensor_rows(weight: torch.Tensor) -> RowReader:
    return lambda start, end: weight[start:end].detach()


def quantise_embeddings(model: nn.Module, read: Mapping[str, RowReader] | None = None
                        ) -> nn.Module:
    """Replace `model`'s token embedding (and its output head: one shared table when they
    are tied) by NF4 ones, in place; refuses layers it cannot stand in for. `read` may give,
    by parameter name, a reader of the weight's rows that does not touch the tensor (the
    checkpoint file read directly: its pages mapped into memory are never read)."""
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    if type(embedding) is not nn.Embedding:
        raise ValueError(f"model.quantization=nf4-embeddings needs a plain nn.Embedding; "
                         f"this model's is {type(embedding).__name__}: use nf4")
    if head is not None and (type(head) is not nn.Linear or head.bias is not None):
        raise ValueError(f"model.quantization=nf4-embeddings needs a bias-free nn.Linear "
                         f"head; this model's is {type(head).__name__}: use nf4")
    read = read or {}

    def table(weight: torch.Tensor) -> Nf4Table:  # a tied weight has several names
        names = [n for n, p in model.named_parameters(remove_duplicate=False) if p is weight]
        reader = next((read[n] for n in names if n in read), tensor_rows(weight))
        return Nf4Table(tuple(weight.shape), reader)

    shared = table(embedding.weight)
    model.set_input_embeddings(Nf4Embedding(shared, embedding.padding_idx))
    if head is not None:
        tied = head.weight is embedding.weight
        model.set_output_embeddings(Nf4Head(shared if tied else table(head.weight)))
    model.config.tie_word_embeddings = False  # nothing left to tie: a reload would re-tie
    return model
