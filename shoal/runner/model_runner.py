"""Flattens the scheduled tokens of all sequences into one batch and runs one forward pass over the paged KV pool."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from shoal.core.sequence import Sequence
from shoal.kernels.backend import ScheduledSlice
from shoal.kernels.torch_ops import write_kv
from shoal.models.llama import CausalLM

DEFAULT_CPU_KV_SHARE = 0.25
DEFAULT_CPU_KV_CAP = 4 << 30
DEFAULT_GPU_KV_SHARE = 0.8


def available_memory(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    with open("/proc/meminfo") as f:
        info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
    return info.get("MemAvailable", info.get("MemFree", 0))


def default_kv_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return int(available_memory(device) * DEFAULT_GPU_KV_SHARE)
    return min(int(available_memory(device) * DEFAULT_CPU_KV_SHARE), DEFAULT_CPU_KV_CAP)


@dataclass
class StepBatch:
    input_ids: torch.Tensor
    positions: torch.Tensor
    meta: Any  # the back end's attention metadata
    logit_rows: list[int]  # rows whose hidden state gives a next-token distribution
    logit_owners: list[int]  # for each of those rows, its sequence's index in the scheduled list
    num_rows: int  # real (unpadded) token rows
    prompt_spans: list[PromptSpan] = field(default_factory=list)  # rows of prompts that want logprobs


@dataclass
class PromptSpan:
    """Rows rows[0]..rows[-1] predict prompt tokens first, first+1, ... of scheduled[index]."""

    index: int
    first: int
    rows: list[int]


@dataclass
class StepLogits:
    logits: torch.Tensor  # [R, vocab] float32 CPU: the next-token rows
    owners: list[int]  # each row's index in the scheduled list
    prompt: dict[int, tuple[int, torch.Tensor]]  # scheduled index -> (first prompt token, its rows' logits)


class ModelRunner:
    """Owns the KV pool: per layer (k, v) of [num_blocks + 1, Hkv, B, D]; the last block is scratch for padding."""

    def __init__(
        self,
        model: CausalLM,
        block_size: int,
        kv_cache_memory: int | None,
        kv_dtype: torch.dtype | None = None,
    ):
        """kv_dtype: how the KV pool stores keys and values (default: the activations' dtype); attention
        computes in the activations' dtype whatever it is."""
        cfg, backend = model.cfg, model.backend
        kv_dtype = kv_dtype or backend.dtype
        self.model, self.backend = model, backend
        self.block_size = block_size
        self.device = backend.device
        budget = kv_cache_memory or default_kv_memory(self.device)
        per_block = 2 * cfg.num_layers * cfg.num_kv_heads * block_size * cfg.head_dim * kv_dtype.itemsize
        self.num_blocks = budget // per_block
        if self.num_blocks < 1:
            raise ValueError(
                f"kv_cache_memory={budget} bytes holds no KV block (one block of {block_size} tokens needs "
                f"{per_block} bytes); raise kv_cache_memory"
            )
        self.kv_cache_bytes = self.num_blocks * per_block
        self.scratch_block = self.num_blocks
        shape = (self.num_blocks + 1, cfg.num_kv_heads, block_size, cfg.head_dim)
        self.kv_caches = [
            (
                torch.zeros(shape, dtype=kv_dtype, device=self.device),
                torch.zeros(shape, dtype=kv_dtype, device=self.device),
            )
            for _ in range(cfg.num_layers)
        ]

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        if not copies:
            return
        src = torch.tensor([s for s, _ in copies], device=self.device)
        dst = torch.tensor([d for _, d in copies], device=self.device)
        for k, v in self.kv_caches:
            k[dst] = k[src]
            v[dst] = v[src]

    def read_kv(self, block_table: list[int], num_tokens: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer, the K and V of positions 0..num_tokens-1 as contiguous CPU tensors [num_tokens, Hkv, D]."""
        table = block_table[: -(-num_tokens // self.block_size)]

        def tokens(cache: torch.Tensor) -> torch.Tensor:
            kv = cache[table].permute(0, 2, 1, 3).reshape(-1, cache.shape[1], cache.shape[3])
            return kv[:num_tokens].to("cpu").contiguous()

        return [(tokens(k), tokens(v)) for k, v in self.kv_caches]

    def write_kv(self, block_table: list[int], layers: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """The inverse of read_kv: K and V [num_tokens, Hkv, D] per layer into the blocks of block_table."""
        bs = self.block_size
        num_tokens = layers[0][0].shape[0]
        slots = self._tensor([block_table[p // bs] * bs + p % bs for p in range(num_tokens)])
        for (k_cache, v_cache), (k, v) in zip(self.kv_caches, layers, strict=True):
            write_kv(
                k_cache, v_cache, k.to(self.device, k_cache.dtype), v.to(self.device, v_cache.dtype), slots
            )

    def build(self, scheduled: list[tuple[Sequence, int]]) -> StepBatch:
        bs = self.block_size
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        slices: list[ScheduledSlice] = []
        logit_rows: list[int] = []
        logit_owners: list[int] = []
        spans: list[PromptSpan] = []
        for index, (seq, n) in enumerate(scheduled):
            start = seq.num_computed_tokens
            span = range(start, start + n)
            ids.extend(seq.token_ids[start : start + n])
            positions.extend(span)
            slots.extend(seq.block_table[p // bs] * bs + p % bs for p in span)
            slices.append(ScheduledSlice(start, n, seq.block_table[: (start + n - 1) // bs + 1]))
            if start + n == seq.num_tokens:
                logit_rows.append(len(ids) - 1)
                logit_owners.append(index)
            if seq.params.prompt_logprobs is not None and start < seq.num_prompt_tokens - 1:
                end = min(start + n, seq.num_prompt_tokens - 1)  # row p predicts token p + 1
                first_row = len(ids) - n
                spans.append(PromptSpan(index, start + 1, list(range(first_row, first_row + end - start))))
        num_rows = len(ids)
        pad = self.backend.rows_for(num_rows) - num_rows
        meta = self.backend.attention_metadata(slices, slots, num_rows + pad, self.scratch_block, bs)
        ids += [0] * pad
        positions += [0] * pad
        return StepBatch(
            self._tensor(ids), self._tensor(positions), meta, logit_rows, logit_owners, num_rows, spans
        )

    def _tensor(self, values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=self.device)

    @torch.inference_mode()
    def run(self, scheduled: list[tuple[Sequence, int]], copies: list[tuple[int, int]]) -> StepLogits:
        """One forward pass: the next-token logits of the sequences that reached their last token, and the
        logits of every prompt position of sequences that asked for prompt logprobs."""
        self.copy_blocks(copies)
        batch = self.build(scheduled)
        hidden = self.model(batch.input_ids, batch.positions, self.kv_caches, batch.meta)
        rows = batch.logit_rows + [r for span in batch.prompt_spans for r in span.rows]
        logits = self.logits(hidden[rows])
        prompt, at = {}, len(batch.logit_rows)
        for span in batch.prompt_spans:
            prompt[span.index] = (span.first, logits[at : at + len(span.rows)])
            at += len(span.rows)
        return StepLogits(logits[: len(batch.logit_rows)], batch.logit_owners, prompt)

    def logits(self, rows: torch.Tensor) -> torch.Tensor:
        """Logits of hidden rows, padded as the back end needs (the padding rows are dropped)."""
        pad = self.backend.rows_for(rows.shape[0]) - rows.shape[0]
        if pad > 0:
            rows = torch.cat([rows, rows.new_zeros(pad, rows.shape[1])])
        return self.model.compute_logits(rows)[: rows.shape[0] - pad].float().cpu()
