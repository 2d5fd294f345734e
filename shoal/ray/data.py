"""A Ray Data processor: `build_processor(...)(dataset)` maps rows with `prompt` (or chat `messages`) and
optional per-row sampling fields to rows with the generated text, as `ray.data.llm` users know it."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from shoal.errors import ShoalError
from shoal.ray.cluster import ray_module
from shoal.sampling_params import SamplingParams

SAMPLING_FIELDS = {f.name for f in fields(SamplingParams)} - {"structured_outputs"}
OUTPUT_COLUMNS = ("generated_text", "finish_reason", "num_input_tokens", "num_generated_tokens", "error")


class ShoalPredictor:
    """Runs in each actor of the pool: loads the model once; each batch goes to the engine whole, so it is
    decoded as one continuous batch."""

    def __init__(self, model: str | None, engine_options: dict[str, Any], sampling: dict[str, Any]) -> None:
        from shoal.llm import LLM

        self.llm = LLM(model, **engine_options)
        self.sampling = sampling

    def __call__(self, batch: dict[str, Any]) -> dict[str, list[Any]]:
        rows = _rows(batch)
        results: list[dict[str, Any]] = [{} for _ in rows]
        inputs, where = [], []
        for i, row in enumerate(rows):
            try:
                inputs.append(self._input(row))
                where.append(i)
            except (ShoalError, ValueError, TypeError) as e:  # one bad row never fails the batch
                results[i] = _failed(f"{type(e).__name__}: {e}")
        if inputs:
            outputs = self.llm.generate([p for p, _ in inputs], [s for _, s in inputs], use_tqdm=False)
            for i, out in zip(where, outputs, strict=True):
                c = out.outputs[0]
                results[i] = {
                    "generated_text": c.text,
                    "finish_reason": c.finish_reason,
                    "num_input_tokens": len(out.prompt_token_ids),
                    "num_generated_tokens": len(c.token_ids),
                    "error": out.error,
                }
        columns = {name: [row.get(name) for row in rows] for name in batch}
        columns.update({name: [r.get(name) for r in results] for name in OUTPUT_COLUMNS})
        return columns

    def _input(self, row: dict[str, Any]) -> tuple[str | list[int], SamplingParams]:
        overrides = {k: v for k, v in row.items() if k in SAMPLING_FIELDS and v is not None}
        params = SamplingParams(**{**self.sampling, **overrides})
        if row.get("messages") is not None:
            prompt: str | list[int] = self.llm.model.render_chat(list(row["messages"]))
        elif row.get("prompt") is not None:
            prompt = row["prompt"] if isinstance(row["prompt"], str) else [int(t) for t in row["prompt"]]
        else:
            raise ShoalError("a row needs a 'prompt' or 'messages' column")
        self.llm.engine.process_input(prompt, params)  # refuse a bad row before the batch is queued
        return prompt, params


def _rows(batch: dict[str, Any]) -> list[dict[str, Any]]:
    names = list(batch)
    count = len(batch[names[0]]) if names else 0
    return [{name: _plain(batch[name][i]) for name in names} for i in range(count)]


def _plain(value: Any) -> Any:
    """numpy scalars and arrays (as Ray Data hands them) as Python values."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, float) and value != value:  # NaN: a missing value
        return None
    return value


def _failed(message: str) -> dict[str, Any]:
    return {
        "generated_text": None,
        "finish_reason": None,
        "num_input_tokens": 0,
        "num_generated_tokens": 0,
        "error": message,
    }


@dataclass
class Processor:
    model: str | None
    engine_options: dict[str, Any] = field(default_factory=dict)
    sampling: dict[str, Any] = field(default_factory=dict)
    replicas: int = 1
    num_threads: int = 1
    batch_size: int = 64

    def __call__(self, dataset: Any) -> Any:
        """The dataset with the output columns added (each input column kept)."""
        ray_module()
        options = {**self.engine_options, "num_threads": self.num_threads}
        return dataset.map_batches(
            ShoalPredictor,
            fn_constructor_kwargs={"model": self.model, "engine_options": options, "sampling": self.sampling},
            batch_size=self.batch_size,
            concurrency=self.replicas,
            num_cpus=self.num_threads,
        )


def build_processor(
    model: str | None = None,
    engine_options: dict[str, Any] | None = None,
    sampling: dict[str, Any] | None = None,
    replicas: int = 1,
    num_threads: int = 1,
    batch_size: int = 64,
) -> Processor:
    """A processor for `Dataset` rows with `prompt` (text or token ids) or `messages`, optional per-row
    SamplingParams fields (temperature, max_tokens, seed, ...) over the `sampling` defaults, and any other
    columns (a custom_id), which are kept. It adds generated_text, finish_reason, num_input_tokens,
    num_generated_tokens and error. `replicas` actors of `num_threads` CPUs each run one engine apiece."""
    SamplingParams(**(sampling or {}))  # bad defaults fail here, not in every actor
    return Processor(
        model, dict(engine_options or {}), dict(sampling or {}), replicas, num_threads, batch_size
    )
