"""Flattens the scheduled tokens of all sequences into one batch and runs one forward pass over the paged KV pool."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from shoal.core.sequence import Sequence
from shoal.models.llama import CausalLM
from shoal.runner.attention import AttentionMetadata
from shoal.runner.cpu_kernels import load_kernel

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
    meta: AttentionMetadata
    logit_rows: list[int]  # rows whose hidden state gives a next-token distribution
    logit_owners: list[int]  # for each of those rows, its sequence's index in the scheduled list
    num_rows: int  # real (unpadded) token rows


class ModelRunner:
    """Owns the KV pool: per layer (k, v) of [num_blocks + 1, Hkv, B, D]; the last block is scratch for padding."""

    def __init__(
        self,
        model: CausalLM,
        block_size: int,
        kv_cache_memory: int | None,
        device: torch.device,
        dtype: torch.dtype,
    ):
        cfg = model.cfg
        self.model = model
        self.block_size = block_size
        self.device = device
        budget = kv_cache_memory or default_kv_memory(device)
        per_block = 2 * cfg.num_layers * cfg.num_kv_heads * block_size * cfg.head_dim * dtype.itemsize
        self.num_blocks = budget // per_block
        if self.num_blocks < 1:
            raise ValueError(
                f"kv_cache_memory={budget} bytes holds no KV block (one block of {block_size} tokens needs "
                f"{per_block} bytes); raise kv_cache_memory"
            )
        self.kv_cache_bytes = self.num_blocks * per_block
        self.kernel = load_kernel() if device.type == "cpu" and dtype == torch.float32 else None
        self.scratch_block = self.num_blocks
        shape = (self.num_blocks + 1, cfg.num_kv_heads, block_size, cfg.head_dim)
        self.kv_caches = [
            (torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
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

    def build(self, scheduled: list[tuple[Sequence, int]]) -> StepBatch:
        bs = self.block_size
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        logit_rows: list[int] = []
        logit_owners: list[int] = []
        for index, (seq, n) in enumerate(scheduled):
            start = seq.num_computed_tokens
            span = range(start, start + n)
            ids.extend(seq.token_ids[start : start + n])
            positions.extend(span)
            slots.extend(seq.block_table[p // bs] * bs + p % bs for p in span)
            if start + n == seq.num_tokens:
                logit_rows.append(len(ids) - 1)
                logit_owners.append(index)
        num_rows = len(ids)
        pad = self.model.rows_for(num_rows) - num_rows
        meta_builder = self._kernel_meta if self.kernel is not None else self._torch_meta
        meta = meta_builder(scheduled, num_rows + pad)
        meta.slot_mapping = self._tensor(slots + [self.scratch_block * bs] * pad)
        ids += [0] * pad
        positions += [0] * pad
        return StepBatch(self._tensor(ids), self._tensor(positions), meta, logit_rows, logit_owners, num_rows)

    def _kernel_meta(self, scheduled: list[tuple[Sequence, int]], total_rows: int) -> AttentionMetadata:
        tables: list[int] = []
        offsets: list[int] = []
        positions: list[int] = []
        for seq, n in scheduled:
            start = seq.num_computed_tokens
            offsets.extend([len(tables)] * n)
            positions.extend(range(start, start + n))
            tables.extend(seq.block_table[: (start + n - 1) // self.block_size + 1])
        pad = total_rows - len(positions)
        return AttentionMetadata(
            slot_mapping=None,
            kernel=self.kernel,
            row_table_offset=self._tensor(offsets + [0] * pad),
            tables=self._tensor(tables or [self.scratch_block]),
            row_positions=self._tensor(positions + [-1] * pad),
        )

    def _torch_meta(self, scheduled: list[tuple[Sequence, int]], total_rows: int) -> AttentionMetadata:
        decode_rows, decode_tables, decode_positions, prefills = [], [], [], []
        row = 0
        for seq, n in scheduled:
            start = seq.num_computed_tokens
            table = seq.block_table[: (start + n - 1) // self.block_size + 1]
            if n == 1:
                decode_rows.append(row)
                decode_tables.append(table)
                decode_positions.append(start)
            else:
                prefills.append((row, n, self._tensor(table), self._tensor(list(range(start, start + n)))))
            row += n
        return AttentionMetadata(
            slot_mapping=None,
            decode_rows=self._tensor(decode_rows) if decode_rows else None,
            decode_tables=self._pad_tables(decode_tables) if decode_rows else None,
            decode_positions=self._tensor(decode_positions) if decode_rows else None,
            prefills=prefills,
        )

    def _pad_tables(self, tables: list[list[int]]) -> torch.Tensor:
        width = max(len(t) for t in tables)
        return self._tensor([t + [self.scratch_block] * (width - len(t)) for t in tables])

    def _tensor(self, values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=self.device)

    @torch.inference_mode()
    def run(
        self, scheduled: list[tuple[Sequence, int]], copies: list[tuple[int, int]]
    ) -> tuple[torch.Tensor, list[int]]:
        """One forward pass. Returns logits [R, vocab] (float32, CPU) for the rows in logit_rows order,
        and the indexes into `scheduled` that those rows belong to."""
        self.copy_blocks(copies)
        batch = self.build(scheduled)
        hidden = self.model(batch.input_ids, batch.positions, self.kv_caches, batch.meta)
        rows = hidden[batch.logit_rows]
        pad = self.model.rows_for(rows.shape[0]) - rows.shape[0]
        if pad > 0:
            rows = torch.cat([rows, rows.new_zeros(pad, rows.shape[1])])
        logits = self.model.compute_logits(rows)[: len(batch.logit_rows)]
        return logits.float().cpu(), batch.logit_owners
