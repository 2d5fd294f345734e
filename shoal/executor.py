"""BatchedExecutor: the caller drives every step; all conversations with pending tokens share one forward pass.

Conversations sit directly on the paged KV pool (BlockManager + ModelRunner), with no scheduler: `infer()`
either computes every pending token or, when the KV blocks they need are not free, changes nothing and
returns DecodeResult.NO_KV_SLOT.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import struct
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from shoal.core.sequence import Sequence
from shoal.engine.core import EngineCore
from shoal.engine.request import sample_seed
from shoal.errors import DisposedError, InvalidRequestError, ShoalError
from shoal.models.loaded import LoadedModel
from shoal.runner.sampler import SampleRequest, sample_row
from shoal.sampling_params import MAX_SEED, SamplingParams, StructuredOutputsParams, check_seed

STATE_FORMAT = "shoal.conversation/1"


class DecodeResult(Enum):
    OK = "ok"
    NO_KV_SLOT = "no_kv_slot"  # not enough free KV blocks: nothing was computed, dispose some conversations


@dataclass(eq=False)
class Conversation:
    """One token stream of a BatchedExecutor: prompt it, run `executor.infer()`, then sample it.

    Tokens are pending until an infer() computes their KV; sample() needs the logits that the last
    infer() left for this conversation.
    """

    executor: BatchedExecutor
    seq: Sequence
    seed: int
    generator: torch.Generator = field(init=False)
    logits: torch.Tensor | None = None  # [vocab] float32 after the last token was computed
    disposed: bool = False
    _num_forks: int = 0
    _guide: tuple[StructuredOutputsParams, Any] | None = (
        None  # the structured output being sampled, its matcher
    )

    def __post_init__(self) -> None:
        self.generator = torch.Generator().manual_seed(self.seed)

    # -- state --------------------------------------------------------------------------------------
    @property
    def token_ids(self) -> list[int]:
        return list(self.seq.token_ids)

    @property
    def token_count(self) -> int:
        return self.seq.num_tokens

    @property
    def num_computed_tokens(self) -> int:
        return self.seq.num_computed_tokens

    @property
    def requires_inference(self) -> bool:
        return self.seq.num_pending_tokens > 0

    @property
    def requires_sampling(self) -> bool:
        return self.logits is not None

    @property
    def block_table(self) -> list[int]:
        return list(self.seq.block_table)

    def _check(self) -> None:
        if self.disposed:
            raise DisposedError(f"conversation {self.seq.seq_id} was disposed; create or fork a new one")

    # -- operations ---------------------------------------------------------------------------------
    def prompt(self, prompt: str | list[int] | int, add_special_tokens: bool | None = None) -> None:
        """Queue tokens (text is tokenized; special tokens are added only to an empty conversation by default)."""
        self._check()
        if isinstance(prompt, str):
            add = self.token_count == 0 if add_special_tokens is None else add_special_tokens
            ids = self.executor.tokenizer.encode(prompt, add_special_tokens=add)
        else:
            ids = [prompt] if isinstance(prompt, int) else list(prompt)
        self.executor.check_tokens(self.seq.token_ids, ids)
        self.seq.token_ids.extend(ids)
        if ids:
            self.logits = None

    def sample(self, params: SamplingParams | None = None) -> int:
        """Pick the next token from this conversation's logits with its own generator, and queue it.

        params: temperature, top_k, top_p, min_p and penalties (which see every token of the conversation),
        logit_bias and structured_outputs (which constrain the tokens this method samples, from the first
        call with that spec on; once its grammar is complete only EOS is allowed); None means greedy. The
        generator is seeded at create()/fork(); SamplingParams.seed is not used.
        """
        self._check()
        if self.logits is None:
            hint = (
                "call executor.infer() first"
                if self.requires_inference
                else "prompt it, then call executor.infer()"
            )
            raise ShoalError(f"conversation {self.seq.seq_id} has no logits to sample: {hint}")
        if self.token_count >= self.executor.max_model_len:
            raise InvalidRequestError(
                f"the conversation is at max_model_len ({self.executor.max_model_len}) tokens"
            )
        params = params or SamplingParams(temperature=0.0)
        ids = self.seq.token_ids
        request = SampleRequest(params, None if params.greedy else self.generator, ids, ids, [])
        matcher = self._matcher(params.structured_outputs)
        if matcher is not None:
            (request.allowed,) = self.executor.core.masks.masks([matcher])
        token = sample_row(self.logits.clone(), request).token_id
        if matcher is not None and not matcher.consume_token(token):
            raise ShoalError(f"the structured output refused token {token}: {matcher.get_error()}")
        self.prompt([token])
        return token

    def _matcher(self, spec: StructuredOutputsParams | None) -> Any:
        if spec is None:
            return None
        if self._guide is None or self._guide[0] != spec:
            self._guide = (spec, self.executor.core.grammars.compile(spec))
        return self._guide[1]

    def fork(self, seed: int | None = None) -> Conversation:
        """A child sharing every KV block of this conversation (copy on write) and a copy of its logits.

        The child's generator is seeded with `seed`, or a seed derived from this conversation's, so parent
        and child sample differently from the same logits.
        """
        self._check()
        self._num_forks += 1
        child_seed = sample_seed(self.seed, self._num_forks) if seed is None else check_seed(seed)
        child = self.executor._new_conversation(list(self.seq.token_ids), child_seed)
        self.executor.block_manager.fork(self.seq, child.seq)
        child.logits = None if self.logits is None else self.logits.clone()
        if self._guide is not None:
            child._guide = (self._guide[0], self._guide[1].deep_copy())
        return child

    def rewind(self, num_tokens: int) -> None:
        """Drop the last num_tokens tokens (and their KV). Prompt again before sampling."""
        self._check()
        if not 0 <= num_tokens <= self.token_count:
            raise InvalidRequestError(f"can rewind 0..{self.token_count} tokens, not {num_tokens}")
        if num_tokens == 0:
            return
        keep = self.token_count - num_tokens
        del self.seq.token_ids[keep:]
        self.executor.block_manager.truncate(self.seq, keep)
        self.logits = None

    def save(self, path: str | os.PathLike | None = None) -> bytes | None:
        """The conversation as safetensors bytes (tokens, the KV of its computed tokens, logits, RNG state);
        with a path, written to that file instead."""
        self._check()
        data = self.executor._serialize(self)
        if path is None:
            return data
        Path(path).write_bytes(data)
        return None

    def dispose(self) -> None:
        """Free this conversation's KV blocks (blocks shared with forks stay with them). Idempotent."""
        if self.disposed:
            return
        self.executor._release(self)
        self.disposed = True
        self.logits = None

    def __enter__(self) -> Conversation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.dispose()


class BatchedExecutor:
    """BatchedExecutor(model=None, batch_size=512, **engine options such as kv_cache_memory, block_size).

    model: a LoadedModel (weights shared, this executor gets its own KV pool), a path, or None for the
    default model. Not thread-safe: drive it from one thread.
    """

    def __init__(self, model: str | LoadedModel | None = None, batch_size: int = 512, **engine_options: Any):
        self.core = EngineCore.from_options(model, {"max_num_batched_tokens": batch_size, **engine_options})
        self.config, self.model = self.core.config, self.core.model
        self.tokenizer = self.model.tokenizer
        self.batch_size = self.config.max_num_batched_tokens
        self.max_model_len = self.core.max_model_len
        self.block_manager = self.core.block_manager
        self.conversations: list[Conversation] = []  # live ones, in creation order
        self._ids = itertools.count()

    # -- conversations ------------------------------------------------------------------------------
    def create(self, seed: int | None = None) -> Conversation:
        """A new, empty conversation whose sampling generator is seeded with `seed` (random when None)."""
        seed = random.SystemRandom().randrange(MAX_SEED) if seed is None else check_seed(seed)
        return self._new_conversation([], seed)

    def _new_conversation(self, token_ids: list[int], seed: int) -> Conversation:
        seq = Sequence(f"conv-{next(self._ids)}", token_ids, len(token_ids), SamplingParams())
        conv = Conversation(self, seq, seed)
        self.conversations.append(conv)
        return conv

    def _release(self, conv: Conversation) -> None:
        self.block_manager.free_seq(conv.seq)
        self.conversations.remove(conv)

    def check_tokens(self, history: list[int], ids: list[int]) -> None:
        vocab = self.model.config.vocab_size
        if any(not isinstance(t, int) or not 0 <= t < vocab for t in ids):
            raise InvalidRequestError(f"token ids must be integers in [0, {vocab})")
        if len(history) + len(ids) > self.max_model_len:
            raise InvalidRequestError(
                f"the conversation would hold {len(history) + len(ids)} tokens, over max_model_len "
                f"{self.max_model_len}; rewind it or start a new one"
            )

    @property
    def batched_token_count(self) -> int:
        """Tokens waiting for the next infer()."""
        return sum(c.seq.num_pending_tokens for c in self.conversations)

    # -- inference ----------------------------------------------------------------------------------
    def infer(self) -> DecodeResult:
        """Compute every pending token of every conversation, in forward passes of at most batch_size tokens.

        Returns NO_KV_SLOT, having changed nothing, when the KV blocks all of them need are not free.
        """
        pending = [c for c in self.conversations if c.requires_inference]
        if not pending:
            return DecodeResult.OK
        bm = self.block_manager
        matched = [c for c in pending if self._match_prefix(c)]
        needed = sum(bm.blocks_to_grow(c.seq, c.seq.num_pending_tokens) for c in pending)
        if needed > bm.num_free_blocks:
            for conv in matched:  # undo: they hold cached blocks again only when inference really runs
                bm.free_seq(conv.seq)
            return DecodeResult.NO_KV_SLOT
        while pending:
            self._forward(pending)
            pending = [c for c in pending if c.requires_inference]
        return DecodeResult.OK

    def _match_prefix(self, conv: Conversation) -> bool:
        seq = conv.seq
        if seq.block_table or seq.num_computed_tokens:
            return False
        return self.block_manager.match_prefix(seq) > 0

    def _forward(self, pending: list[Conversation]) -> None:
        budget, scheduled, owners = self.batch_size, [], []
        for conv in pending:
            if budget == 0:
                break
            n = min(conv.seq.num_pending_tokens, budget)
            self.block_manager.grow(conv.seq, n)
            scheduled.append((conv.seq, n))
            owners.append(conv)
            budget -= n
        step = self.core.forward(scheduled, self.block_manager.take_copies())
        for row, index in enumerate(step.owners):
            owners[index].logits = step.logits[row].clone()

    # -- save / load --------------------------------------------------------------------------------
    def _shape_metadata(self) -> dict[str, str]:
        cfg = self.model.config
        return {
            "num_layers": str(cfg.num_layers),
            "num_kv_heads": str(cfg.num_kv_heads),
            "head_dim": str(cfg.head_dim),
        }

    def _serialize(self, conv: Conversation) -> bytes:
        seq = conv.seq
        computed = seq.num_computed_tokens
        tensors = {
            "token_ids": torch.tensor(seq.token_ids, dtype=torch.int64),
            "rng_state": conv.generator.get_state(),
        }
        if conv.logits is not None:
            tensors["logits"] = conv.logits.clone()
        for i, (k, v) in enumerate(self.core.runner.read_kv(seq.block_table, computed) if computed else []):
            tensors[f"layers.{i}.k"], tensors[f"layers.{i}.v"] = k, v  # [computed, Hkv, D]
        metadata = {
            "format": STATE_FORMAT,
            "model": self.model.name,
            "num_computed_tokens": str(computed),
            "seed": str(conv.seed),
            **self._shape_metadata(),
        }
        return save_tensors(tensors, metadata)

    def load(self, state: bytes | str | os.PathLike) -> Conversation:
        """A new conversation from conv.save() bytes or file: same tokens, its KV written into fresh blocks,
        same logits and RNG state, so it continues exactly as the saved one would have."""
        data = state if isinstance(state, bytes | bytearray) else Path(state).read_bytes()
        metadata = _read_metadata(data)
        if metadata.get("format") != STATE_FORMAT:
            raise InvalidRequestError("this is not a saved shoal conversation (conv.save() output)")
        if any(metadata.get(k) != v for k, v in self._shape_metadata().items()):
            raise InvalidRequestError(
                f"the saved conversation comes from a model of another shape ({metadata.get('model')!r}); "
                f"load it into an executor of that model"
            )
        tensors = _read_tensors(data)
        tokens = tensors["token_ids"].tolist()
        self.check_tokens([], tokens)
        computed, seed = _metadata_int(metadata, "num_computed_tokens"), _metadata_int(metadata, "seed")
        if not 0 <= computed <= len(tokens) or any(
            f"layers.{i}.k" not in tensors for i in range(self.model.config.num_layers if computed else 0)
        ):
            raise InvalidRequestError("the saved conversation's KV cache is incomplete; save it again")
        bm = self.block_manager
        if bm.blocks_needed(computed) > bm.num_free_blocks:
            raise ShoalError(
                f"loading needs {bm.blocks_needed(computed)} free KV blocks, {bm.num_free_blocks} are free: "
                "dispose some conversations first"
            )
        conv = self._new_conversation(tokens, check_seed(seed))
        conv.generator.set_state(tensors["rng_state"])
        conv.logits = tensors.get("logits")
        self._write_kv(conv.seq, computed, tensors)
        return conv

    def _write_kv(self, seq: Sequence, computed: int, tensors: dict[str, torch.Tensor]) -> None:
        if computed == 0:
            return
        bm = self.block_manager
        bm.grow(seq, computed)
        layers = [
            (tensors[f"layers.{i}.k"], tensors[f"layers.{i}.v"]) for i in range(self.model.config.num_layers)
        ]
        self.core.runner.write_kv(seq.block_table, layers)
        seq.num_computed_tokens = computed
        bm.register_computed(seq)


def _metadata_int(metadata: dict[str, str], key: str) -> int:
    try:
        return int(metadata[key])
    except (KeyError, ValueError):
        raise InvalidRequestError(f"the saved conversation has no valid {key!r}; save it again") from None


def _read_tensors(data: bytes | bytearray) -> dict[str, torch.Tensor]:
    try:
        tensors = load_tensors(bytes(data))
    except Exception as e:  # safetensors raises its own error type for a truncated or corrupt buffer
        raise InvalidRequestError(
            f"cannot read the saved conversation ({e}); it is truncated or damaged: save it again"
        ) from e
    missing = {"token_ids", "rng_state"} - set(tensors)
    if missing:
        raise InvalidRequestError(f"the saved conversation lacks {sorted(missing)}; save it again")
    return tensors


def _read_metadata(data: bytes | bytearray) -> dict[str, str]:
    """The __metadata__ of a safetensors buffer: an 8-byte little-endian header length, then a JSON header."""
    try:
        (length,) = struct.unpack("<Q", data[:8])
        return json.loads(bytes(data[8 : 8 + length])).get("__metadata__") or {}
    except (struct.error, ValueError) as e:
        raise InvalidRequestError(f"cannot read the saved conversation: {e}") from e
