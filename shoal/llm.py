"""The offline front end, shaped like vLLM's: LLM(model).generate(prompts, sampling_params)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from tqdm import tqdm

from shoal.engine.llm_engine import LLMEngine, ProcessedInput
from shoal.engine.request import OutputKind
from shoal.errors import InvalidRequestError
from shoal.models.loaded import LoadedModel
from shoal.outputs import RequestOutput
from shoal.sampling_params import SamplingParams

Prompt = str | list[int]
Message = dict[str, Any]


class LLM:
    """LLM(model=None, **engine options). model: HF directory, .gguf file, hub id, a LoadedModel, or None
    for the default SmolLM2-135M-Instruct."""

    def __init__(self, model: str | LoadedModel | None = None, **engine_options: Any):
        self.engine = LLMEngine.from_options(model, engine_options)
        self.model = self.engine.model
        self.tokenizer = self.engine.tokenizer

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        priority: Sequence[int] | None = None,
    ) -> list[RequestOutput]:
        """Results come back in input order. All prompts are validated before any is queued."""
        prompts = _as_prompt_list(prompts)
        params = _as_params_list(sampling_params, len(prompts))
        inputs = [self.engine.process_input(p, sp) for p, sp in zip(prompts, params, strict=True)]
        return self._run(inputs, priority, use_tqdm)

    def get_tokenizer(self) -> Any:
        """The model's Hugging Face tokenizer (as vLLM's LLM.get_tokenizer())."""
        return self.model.tokenizer

    def chat(
        self,
        messages: list[Message] | list[list[Message]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        add_generation_prompt: bool = True,
    ) -> list[RequestOutput]:
        """One conversation (a list of {role, content}) or a list of them, through the model's chat template
        (rendered to token ids once; each output's prompt is the rendered text)."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        template = self.model.chat_template
        texts = [template.render(c, add_generation_prompt) for c in conversations]
        params = _as_params_list(sampling_params, len(texts))
        inputs = [
            replace(self.engine.process_input(template.encode_rendered(text), sp), text=text)
            for text, sp in zip(texts, params, strict=True)
        ]
        return self._run(inputs, None, use_tqdm)

    def _run(
        self, inputs: list[ProcessedInput], priority: Sequence[int] | None, use_tqdm: bool
    ) -> list[RequestOutput]:
        priorities = list(priority) if priority is not None else [0] * len(inputs)
        request_ids = [
            self.engine.add_request(i, None, None, prio, OutputKind.FINAL)
            for i, prio in zip(inputs, priorities, strict=True)
        ]
        done: dict[str, RequestOutput] = {}
        mine = set(request_ids)
        bar = tqdm(
            total=len(request_ids), desc="Generating", unit="req", disable=not use_tqdm, dynamic_ncols=True
        )
        start, generated = time.perf_counter(), 0
        try:
            while len(done) < len(request_ids):
                for out in self.engine.step():
                    if out.finished and out.request_id in mine:
                        done[out.request_id] = out
                        generated += sum(len(c.token_ids) for c in out.outputs)
                        bar.update(1)
                        bar.set_postfix(tok_s=f"{generated / (time.perf_counter() - start):.1f}")
        except BaseException:
            for rid in request_ids:
                self.engine.abort_request(rid)
            self.engine.step()
            raise
        finally:
            bar.close()
        return [done[r] for r in request_ids]


def _as_prompt_list(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
    if isinstance(prompts, str):
        return [prompts]
    if not isinstance(prompts, Sequence):
        raise InvalidRequestError(
            f"prompts must be a string, a list of token ids or a list of those, got {type(prompts).__name__}"
        )
    prompts = list(prompts)
    if prompts and all(isinstance(t, int) for t in prompts):
        return [prompts]
    return prompts


def _as_params_list(
    params: SamplingParams | Sequence[SamplingParams] | None, count: int
) -> list[SamplingParams]:
    if params is None:
        return [SamplingParams()] * count
    if isinstance(params, SamplingParams):
        return [params] * count
    params = list(params)
    if not all(isinstance(p, SamplingParams) for p in params):
        raise InvalidRequestError("sampling_params must be a SamplingParams or a list of them")
    if len(params) != count:
        raise InvalidRequestError(
            f"got {len(params)} SamplingParams for {count} prompts; give one, or one per prompt"
        )
    return params
