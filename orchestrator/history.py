"""The root model's message history, kept from rotting.

Layout: the system prompt, the question, then turns of (assistant response, observation). Long
observations arrive already cut by the sandbox. Once the history passes ``history_max_chars``,
older turns are compacted, either dropped with a note (``window``) or replaced by a summary the
model writes (``summary``), while the system prompt, the question and the latest
``keep_last_turns`` turns stay whole.

In a session (``follow_up``), a later question arrives as the user message after the previous
answer; earlier questions and answers are turns like any other, compacted like any other. The
question being answered is never lost: once the turn that asked it is compacted away, the note
standing for the compacted turns repeats it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from rlmq.protocol import ChatMessage

__all__ = ["Compaction", "History"]

SUMMARY_REQUEST = (
    "Your history is getting long, so earlier turns will be replaced by your own summary. "
    "Summarise the turns above: what you learned about the context, the variables and functions "
    "you defined in the REPL (they still exist), partial results, and what is left to do. "
    "Be concise and concrete; do not write code."
)


@dataclass(frozen=True, slots=True)
class Compaction:
    dropped_turns: int
    chars_before: int
    chars_after: int
    summary: str | None


@dataclass(slots=True)
class History:
    system: str
    question: str
    turns: list[tuple[str, str]] = field(default_factory=list)  # (assistant, observation)
    pending: str | None = None  # an assistant response whose observation is not in yet
    summary: str | None = None  # the note or summary standing for compacted turns
    compacted_turns: int = 0
    current: str | None = None  # the question of a follow_up being answered
    current_turn: int | None = None  # the index (counting compacted turns) of the turn that asked it

    def follow_up(self, question: str, previous_answer: str | None) -> None:
        """A new question in the same conversation, after the previous one was answered (or a
        limit stopped it: ``previous_answer`` None)."""
        done = (
            f"[Your answer was recorded: {_clip(previous_answer)}]"
            if previous_answer is not None
            else "[The previous question stopped without an answer.]"
        )
        text = f"{done}\n\nNext question: {question}"
        if self.pending is not None:
            self.add_observation(text)
        elif self.turns:  # the last message is already the user's: keep turns alternating
            response, observation = self.turns[-1]
            self.turns[-1] = (response, f"{observation}\n\n{text}")
        else:
            self.question = f"{self.question}\n\n{text}"
            return
        self.current = question
        self.current_turn = self.compacted_turns + len(self.turns) - 1

    def add_response(self, text: str) -> None:
        self.pending = text

    def add_observation(self, text: str) -> None:
        assert self.pending is not None, "an observation answers a response"
        self.turns.append((self.pending, text))
        self.pending = None

    def messages(self, *, extra_user: str | None = None) -> list[ChatMessage]:
        out = [ChatMessage("system", self.system), ChatMessage("user", self.question)]
        if self.summary is not None:
            # As a user message, so that turns still alternate: the question and this note are
            # merged by backends that want alternation, and the next message is the model's.
            out.append(ChatMessage("user", self.summary))
        for response, observation in self.turns:
            out.append(ChatMessage("assistant", response))
            out.append(ChatMessage("user", observation))
        if self.pending is not None:
            out.append(ChatMessage("assistant", self.pending))
        if extra_user is not None:
            out.append(ChatMessage("user", extra_user))
        return out

    def chars(self) -> int:
        return sum(len(m.content) for m in self.messages())

    async def compact_if_needed(
        self,
        *,
        max_chars: int,
        keep_last_turns: int,
        mode: str,
        summarise: Callable[[list[ChatMessage]], Awaitable[str]],
    ) -> Compaction | None:
        """Compact older turns when the history is over ``max_chars``; None if nothing to do."""
        before = self.chars()
        if before <= max_chars or len(self.turns) <= keep_last_turns:
            return None
        old, keep = self.turns[:-keep_last_turns], self.turns[-keep_last_turns:]
        summary: str | None = None
        if mode == "summary":
            # The model summarises the turns about to go, with the question for orientation.
            request = History(self.system, self.question, old, summary=self.summary)
            summary = await summarise(request.messages(extra_user=SUMMARY_REQUEST))
            note = (
                f"[Summary of your {self.compacted_turns + len(old)} earlier turns, in your words]\n{summary}"
            )
        else:
            note = (
                f"[{self.compacted_turns + len(old)} earlier turns were dropped to keep the history "
                "short. Everything you defined in the REPL still exists; print variables to recall them.]"
            )
        if self.current_turn is not None and self.current_turn < self.compacted_turns + len(old):
            note += f"\n\n[The question you are answering now: {self.current}]"
        self.compacted_turns += len(old)
        self.turns = keep
        self.summary = note
        return Compaction(len(old), before, self.chars(), summary)


def _clip(text: str | None, limit: int = 2_000) -> str:
    text = text or ""
    return text if len(text) <= limit else text[:limit] + f" ... [{len(text) - limit:,} more characters]"
