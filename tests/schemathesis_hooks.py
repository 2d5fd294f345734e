"""The rules of a valid request that a JSON Schema cannot state, for schemathesis (SCHEMATHESIS_HOOKS): a
generated body that breaks one of them is not "schema-valid data" the server must accept, so it is not
sent. Everything else the document states, and the server must honour it both ways. The server's answers to
these bodies (clear 400s) are tested in test_hostile_requests.py and test_server_errors.py."""

from __future__ import annotations

import json
import os
from typing import Any

import schemathesis

GENERATION = {"/v1/completions", "/v1/chat/completions", "/v1/responses"}
# A body's text can be more tokens than it has characters but never more than its UTF-8 bytes; the chat
# template adds a few tokens per message.
TEMPLATE_TOKENS = 64


@schemathesis.hook
def filter_body(ctx: Any, body: Any) -> bool:
    if ctx.operation.path not in GENERATION or not isinstance(body, dict):
        return True
    return fits_the_context(body) and not free_form_specs(body)


def fits_the_context(body: dict[str, Any]) -> bool:
    """prompt tokens + max_tokens within the context: a sum of two fields no schema can bound."""
    context = int(os.environ["SHOAL_MAX_MODEL_LEN"])
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], list):
        prompt_tokens = max(len(p) for p in prompt)
    elif isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
        prompt_tokens = len(prompt)
    else:
        text = {
            k: v for k, v in body.items() if k in ("prompt", "messages", "input", "instructions", "tools")
        }
        prompt_tokens = len(json.dumps(text, ensure_ascii=False).encode()) + TEMPLATE_TOKENS
    default = 16 if "prompt" in body else 0
    new = [body.get(k) for k in ("max_tokens", "max_completion_tokens", "max_output_tokens")]
    new_tokens = max([n for n in new if isinstance(n, int | float)], default=default)  # 3.0 is an integer
    return prompt_tokens + new_tokens <= context


def free_form_specs(body: dict[str, Any]) -> bool:
    """Grammars, regular expressions and JSON schemas (tool parameters too) are languages of their own: the
    document types them as text or objects, their compiler decides."""
    if any(
        body.get(k) is not None
        for k in ("structured_outputs", "guided_json", "guided_regex", "guided_grammar")
    ):
        return True
    if body.get("tools") or body.get("guided_choice") is not None:
        return True
    formats = [body.get("response_format"), (body.get("text") or {}).get("format")]
    return any(isinstance(f, dict) and f.get("type") == "json_schema" for f in formats)
