"""Gemma's chat template, rendered as pieces that know whether they are control tokens.

    <bos><start_of_turn>user
    {system}\n\n{text}<end_of_turn>
    <start_of_turn>model
    {text}<end_of_turn>
    <start_of_turn>model

The GGUF we embed carries no chat template, so this module is the template. Rendering to
pieces (rather than one string) is what stops a user from forging turns: control pieces
become control tokens, text pieces are tokenized with special-token parsing off, so a user
who types "<start_of_turn>" gets those characters, not the token.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Optional, Sequence

START = "<start_of_turn>"
END = "<end_of_turn>"

# Gemma has two roles; everything a client may send maps onto them.
ROLE_MAP = {"user": "user", "assistant": "model", "model": "model", "tool": "user"}


@dataclass(frozen=True)
class Piece:
    text: str
    control: bool = False


def render_messages(messages: Sequence[object], preamble: Optional[str] = None) -> list[Piece]:
    """Messages (objects with .role and .content) -> pieces ending in an open model turn.

    Gemma has no system role: system text is folded into the next user turn, separated by a
    blank line (what Google's own template does). System text with no user turn after it
    becomes a user turn of its own. `preamble` (the tool descriptions) goes first of all.
    A `tool` message (a tool's result) is a user turn that says so, naming the tool (its `name`,
    or the name of the call its `tool_call_id` answers). An assistant turn's `tool_calls` are
    written as the model writes a call.
    """
    pieces: list[Piece] = []
    pending_system: list[str] = [preamble] if preamble else []
    called: dict[str, str] = {}  # tool_call_id -> the function's name, as the conversation goes
    for msg in messages:
        role, content = msg.role, msg.content  # type: ignore[attr-defined]
        if role == "system":
            pending_system.append(content)
            continue
        calls = getattr(msg, "tool_calls", None) or []
        if calls:  # an assistant turn that called tools: the calls as the model writes them
            called.update({c.id: c.name for c in calls if c.id})
            content = "\n".join(filter(None, [content, *(call_text(c.name, c.arguments) for c in calls)]))
        if role == "tool":
            name = getattr(msg, "name", None) or called.get(getattr(msg, "tool_call_id", None) or "")
            content = f"Result of the tool call{f' to {name}' if name else ''}:\n{content}"
        gemma_role = ROLE_MAP[role]
        if gemma_role == "user" and pending_system:
            content = "\n\n".join(pending_system + [content])
            pending_system = []
        pieces += _turn(gemma_role, content)
    if pending_system:
        pieces += _turn("user", "\n\n".join(pending_system))
    pieces += [Piece(START, True), Piece("model\n")]
    return pieces


def call_text(name: str, arguments: dict) -> str:
    """A tool call as the model writes one (tools.py's grammar makes it write exactly this)."""
    return json.dumps({"name": name, "arguments": arguments})


def render_prompt(prompt: str) -> list[Piece]:
    """An unscoped prompt is one user turn."""
    return _turn("user", prompt) + [Piece(START, True), Piece("model\n")]


def _turn(role: str, text: str) -> list[Piece]:
    return [Piece(START, True), Piece(f"{role}\n{text}"), Piece(END, True), Piece("\n")]


def to_text(pieces: Sequence[Piece]) -> str:
    """The prompt as one string (what a person reads; not what is tokenized)."""
    return "".join(p.text for p in pieces)
