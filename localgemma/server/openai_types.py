"""OpenAI's request bodies, as the wire has them (pydantic). Only these types know OpenAI's
names; `openai_shim` translates each into the Workers AI contract in one function.

Parameters that are not declared here are refused by name ("unknown or unsupported
parameter"). Some that are declared exist only so a client may send their neutral value
(`n: 1`, `logit_bias: {}`); the translation refuses anything else. Bounds are not repeated
here: the contract checks them, once, with its own messages.
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field


class _Wire(BaseModel):
    # strict: "2", 0 and true are not what a number or a boolean field takes (OpenAI refuses them)
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Wire):
    include_usage: bool = False


class ChatMessage(_Wire):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: Union[str, list[dict[str, Any]], None] = None  # a string or a list of content parts
    name: Optional[str] = None
    tool_call_id: Optional[str] = None
    tool_calls: Optional[list[dict[str, Any]]] = None
    refusal: Optional[str] = None


class _Common(_Wire):
    model: str = Field(description="a model id, or MODEL:ADAPTER for a finetune (see GET /v1/models)")
    max_tokens: Optional[int] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    top_k: Optional[int] = Field(None, description="extension (as in vLLM): the contract's top_k")
    seed: Optional[int] = None
    frequency_penalty: Optional[float] = None
    presence_penalty: Optional[float] = None
    repetition_penalty: Optional[float] = Field(None, description="extension: the contract's repetition_penalty")
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    user: Optional[str] = None  # an end-user label; nothing to do with it locally
    stop: Union[str, list[str], None] = Field(None, description="up to 4 stop strings (not returned)")
    # Declared only for their neutral values (see the module docstring).
    n: Optional[int] = None
    logit_bias: Optional[dict[str, float]] = None


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = None
    response_format: Optional[dict[str, Any]] = None
    tools: Optional[list[dict[str, Any]]] = None
    tool_choice: Union[str, dict[str, Any], None] = None
    # At most one call per turn is ever made, so both values are honoured.
    parallel_tool_calls: Optional[bool] = None
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = Field(None, ge=0, le=20)


class CompletionRequest(_Common):
    prompt: Union[str, list[str]]
    echo: Optional[bool] = None
    suffix: Optional[str] = None
    best_of: Optional[int] = None
    logprobs: Optional[int] = Field(None, ge=0, le=5)
