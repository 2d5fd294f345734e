"""EngineCore: one KV pool with its runner, block manager and scheduler, and the one place where a forward
pass advances sequences' computed tokens. LLMEngine (scheduled steps) and BatchedExecutor (steps driven by
the caller) both stand on it."""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

from shoal.config import EngineConfig
from shoal.core.block_manager import BlockManager
from shoal.core.scheduler import Scheduler
from shoal.core.sequence import Sequence
from shoal.engine.structured_output import GrammarCompiler, MaskFiller, tokenizer_vocab
from shoal.models.loaded import LoadedModel, load_model
from shoal.runner.model_runner import ModelRunner, StepLogits

logger = logging.getLogger("shoal")
MAX_DEFAULT_MODEL_LEN = 8192


def resolve_model(model: str | LoadedModel | None, config: EngineConfig) -> LoadedModel:
    """The loaded model an engine runs: given, or loaded from a path (None: the default model)."""
    if isinstance(model, LoadedModel):
        return model
    return load_model(
        model,
        config.device,
        config.dtype,
        config.quantization,
        config.kernels,
        config.weight_cache,
        config.precision,
    )


class EngineCore:
    def __init__(self, model: LoadedModel, config: EngineConfig):
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        self.model, self.config = model, config
        self.max_model_len = config.max_model_len or min(
            model.config.max_position_embeddings, MAX_DEFAULT_MODEL_LEN
        )
        kv_dtype = None if config.kv_cache_dtype == "auto" else getattr(torch, config.kv_cache_dtype)
        self.runner = ModelRunner(model.module, config.block_size, config.kv_cache_memory, kv_dtype)
        self.block_manager = BlockManager(
            self.runner.num_blocks, config.block_size, config.enable_prefix_caching
        )
        self.scheduler = Scheduler(self.block_manager, config.max_num_batched_tokens, config.max_num_seqs)
        vocab = model.config.vocab_size
        self.grammars = GrammarCompiler(model.tokenizer, vocab, model.eos_token_ids)
        spare = max((os.cpu_count() or 1) - torch.get_num_threads(), 0)
        self.masks = MaskFiller(vocab, spare, tokenizer_vocab(model.tokenizer, vocab))
        logger.info(
            "%s; KV cache: %.2f GiB of %s, %d blocks of %d tokens (%d tokens)",
            model.describe_weights(),
            self.runner.kv_cache_bytes / 2**30,
            str(self.runner.kv_caches[0][0].dtype).removeprefix("torch."),
            self.runner.num_blocks,
            config.block_size,
            self.runner.num_blocks * config.block_size,
        )

    @classmethod
    def from_options(cls, model: str | LoadedModel | None, options: dict[str, Any]) -> EngineCore:
        config = EngineConfig.from_options(options)
        return cls(resolve_model(model, config), config)

    def forward(self, scheduled: list[tuple[Sequence, int]], copies: list[tuple[int, int]]) -> StepLogits:
        """One forward pass over the scheduled tokens; their KV is then computed. Returns the logits of the
        sequences that reached their last token (and of prompts that want logprobs)."""
        step = self.runner.run(scheduled, copies)
        for seq, n in scheduled:
            seq.num_computed_tokens += n
            self.block_manager.register_computed(seq)
        return step
