"""shoal: a batched LLM inference engine."""

from shoal.batch_generation import BatchedGeneration, generate_batch
from shoal.config import EngineConfig
from shoal.engine.async_llm import AsyncLLM
from shoal.errors import (
    DisposedError,
    InvalidRequestError,
    ModelLoadError,
    NoSequenceAvailableError,
    ShoalError,
)
from shoal.executor import BatchedExecutor, Conversation, DecodeResult
from shoal.llm import LLM
from shoal.models.loaded import LoadedModel, load_model
from shoal.outputs import CompletionOutput, Logprob, RequestOutput
from shoal.sampling_params import SamplingParams, StructuredOutputsParams
from shoal.sessions import ChatSession, Context, ContextSequence

__all__ = [
    "BatchedExecutor",
    "BatchedGeneration",
    "ChatSession",
    "Context",
    "ContextSequence",
    "Conversation",
    "DecodeResult",
    "DisposedError",
    "NoSequenceAvailableError",
    "generate_batch",
    "LLM",
    "AsyncLLM",
    "CompletionOutput",
    "EngineConfig",
    "InvalidRequestError",
    "LoadedModel",
    "Logprob",
    "ModelLoadError",
    "RequestOutput",
    "SamplingParams",
    "StructuredOutputsParams",
    "ShoalError",
    "load_model",
]
