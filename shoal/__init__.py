"""shoal: a batched LLM inference engine."""

from shoal.config import EngineConfig
from shoal.engine.async_llm import AsyncLLM
from shoal.errors import InvalidRequestError, ModelLoadError, ShoalError
from shoal.llm import LLM
from shoal.models.loaded import LoadedModel, load_model
from shoal.outputs import CompletionOutput, Logprob, RequestOutput
from shoal.sampling_params import SamplingParams

__all__ = [
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
    "ShoalError",
    "load_model",
]
