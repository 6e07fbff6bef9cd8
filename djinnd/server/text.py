"""Text at the edge: prompts and chat turns to token ids, token ids back to text as they stream.

The engine sees token ids only. A chat session keeps the text its tokens stand for, so a new
turn feeds only what the chat template adds after the resident history (no re-prefill).
"""
from dataclasses import dataclass, field

from libdjinn.protocol import ErrorCode, ProtocolError


class Detokenizer:
    """Incremental decode: each token's text delta, holding back half-formed UTF-8. Each push decodes
    only the last few tokens (from the start of the previous word piece), never the whole output."""

    def __init__(self, tokenizer):
        self.tokenizer, self.ids = tokenizer, []
        self.prefix = self.read = 0    # ids[prefix:read] is the text already sent, as context

    def push(self, token: int) -> str:
        self.ids.append(token)
        decode = lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
        sent = decode(self.ids[self.prefix:self.read])
        text = decode(self.ids[self.prefix:])
        if len(text) <= len(sent) or text.endswith("\ufffd"):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return text[len(sent):]


@dataclass
class ChatState:
    messages: list = field(default_factory=list)
    text: str = ""                # what the session's tokens spell, special tokens included


def check_messages(messages) -> list[dict]:
    for m in messages:
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise ProtocolError(ErrorCode.BAD_REQUEST, "generate: each message needs string 'role' and 'content'")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def chat_turn(tokenizer, state: ChatState, new_messages: list[dict]) -> tuple[list[int], ChatState]:
    """The ids this turn feeds and the state the session will have once the reply is recorded."""
    convo = state.messages + new_messages
    text = tokenizer.apply_chat_template(convo, add_generation_prompt=True, tokenize=False)
    if not text.startswith(state.text):
        raise ProtocolError(ErrorCode.BAD_REQUEST, "chat history no longer matches this session's "
                            "tokens; send prompt_ids or open a new session")
    ids = tokenizer.encode(text[len(state.text):], add_special_tokens=False)
    return ids, ChatState(convo, text)


def chat_record_reply(tokenizer, state: ChatState, output: list[int]):
    state.text += tokenizer.decode(output, skip_special_tokens=False)
    state.messages.append({"role": "assistant", "content": tokenizer.decode(output, skip_special_tokens=True)})
