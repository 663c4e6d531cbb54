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
    A `tool` message (a tool's result) is a user turn that says so.
    """
    pieces: list[Piece] = []
    pending_system: list[str] = [preamble] if preamble else []
    for msg in messages:
        role, content = msg.role, msg.content  # type: ignore[attr-defined]
        if role == "system":
            pending_system.append(content)
            continue
        if role == "tool":
            name = getattr(msg, "name", None)
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


def render_prompt(prompt: str) -> list[Piece]:
    """An unscoped prompt is one user turn."""
    return _turn("user", prompt) + [Piece(START, True), Piece("model\n")]


def _turn(role: str, text: str) -> list[Piece]:
    return [Piece(START, True), Piece(f"{role}\n{text}"), Piece(END, True), Piece("\n")]


def to_text(pieces: Sequence[Piece]) -> str:
    """The prompt as one string (what a person reads; not what is tokenized)."""
    return "".join(p.text for p in pieces)
