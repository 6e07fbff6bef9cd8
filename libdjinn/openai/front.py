"""The front's core: an OpenAI request -> token ids -> the conversation that holds their prefix -> a Turn.
Also where phases are inferred: a reply ending in tool_calls puts the session in IO_WAIT, the request
that continues it (bringing the tool results) sets it ACTIVE again."""
import logging
import threading
import time
from dataclasses import dataclass

from libdjinn.client import DjinnError
from libdjinn.openai import tool_calls
from libdjinn.openai.conversations import Conversation, ConversationTable, TooManyConversations, common_prefix
from libdjinn.openai.daemon_link import DaemonLink
from libdjinn.openai.errors import ApiError, bad_request
from libdjinn.openai.phases import ToolDurations
from libdjinn.openai.turn import TextStream, Turn

log = logging.getLogger("djinn-openai")


@dataclass(frozen=True)
class FrontConfig:
    socket: str | None = None
    tokenizer_dir: str | None = None       # default: the one the daemon's hello names
    model_name: str = "djinn"              # the id /v1/models lists and requests must name
    conversation_ttl_s: float = 600.0
    max_conversations: int = 256
    default_max_tokens: int = 1024         # when a chat request gives none (bounded by the context)
    max_body_bytes: int = 8 << 20          # larger request bodies get 413 before they are parsed


class Front:
    def __init__(self, config: FrontConfig):
        self.config = config
        self.link = DaemonLink(config.socket, config.tokenizer_dir)
        self.table = ConversationTable(config.conversation_ttl_s, config.max_conversations)
        self.durations = ToolDurations()
        self.link.on_reset = self.table.clear      # the daemon's sessions died with the connection
        self._max_token_chars = None               # characters of the vocabulary's longest token

    def check_model(self, model: str):
        if model != self.config.model_name:
            raise ApiError(404, f"The model '{model}' does not exist; this server serves "
                           f"'{self.config.model_name}'", "invalid_request_error", "model", "model_not_found")

    def tokenizer(self, why: str):
        self.link.connection()
        if self.link.tokenizer is None:
            raise bad_request(f"the daemon's model has no tokenizer, so {why}; start djinn-openai with --tokenizer-dir")
        return self.link.tokenizer

    # ---- requests -> turns -----------------------------------------------------------------
    def chat_turn(self, req) -> Turn:
        tok = self.tokenizer("chat requests cannot be rendered")
        tools = req.plain_tools()
        forced = tool_calls.forced_prefix(req.tool_choice, tok) if tools else ""
        prompt = tool_calls.render(tok, req.plain_messages(), tools)
        self._check_length(prompt, tok)
        ids = tok.encode(prompt + forced, add_special_tokens=False)
        parse_tools = bool(tools) and req.tool_choice != "none"
        brings_results = req.messages[-1].role == "tool"
        turn = self._turn(ids, req, TextStream(tok, req.stops(), parse_tools, forced), brings_results)
        if forced:     # the forced start is part of the reply: later turns re-render it as they like
            turn.reply_start = common_prefix(ids, tok.encode(prompt, add_special_tokens=False))
        return turn

    def completion_turn(self, req) -> Turn:
        prompt = req.prompt
        if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
            if len(prompt) != 1:
                raise bad_request("only one prompt per request is supported", "prompt")
            prompt = prompt[0]
        if isinstance(prompt, str):
            tok = self.tokenizer("text prompts cannot be tokenized; send token ids")
            self._check_length(prompt, tok)
            ids = tok.encode(prompt)
        else:
            ids = list(prompt)
        self.link.connection()
        return self._turn(ids, req, TextStream(self.link.tokenizer, req.stops(), False, ""), False)

    def _turn(self, ids: list[int], req, stream: TextStream, brings_results: bool) -> Turn:
        if not ids:
            raise bad_request("the prompt is empty", "prompt")
        max_tokens = self._max_tokens(len(ids), req.requested_max_tokens())
        self._close(self.table.expire())
        conv, matched = self.table.claim(ids)
        try:
            if conv is None:
                conv = Conversation(self.link.connection().session())
                self._close(self.table.add(conv))
            elif conv.tool_wait:
                self._leave_io_wait(conv, brings_results)
        except TooManyConversations as e:
            raise ApiError(429, f"{e}; retry later", "rate_limit_error", None, "too_many_conversations")
        except ConnectionError as e:
            self.link.lost(e)
        except DjinnError:
            if conv is not None:
                self.release(conv, None, 0)
            raise
        keep = min(matched, len(ids) - 1)     # at least one token must be fed
        return Turn(self, conv, ids, keep, req.daemon_sampling(max_tokens), stream)

    def _check_length(self, text: str, tok):
        """Refuse text that cannot fit the context before tokenizing it (28 MB took 32 s): no token
        spans more characters than the longest in the vocabulary, so it needs at least this many."""
        if self._max_token_chars is None:
            self._max_token_chars = max(map(len, tok.get_vocab()), default=1) or 1
        least = len(text) // self._max_token_chars
        if least > self.link.max_model_len:
            raise bad_request(f"This model's maximum context length is {self.link.max_model_len} tokens. However, "
                              f"your messages hold at least {least} tokens ({len(text)} characters).", "messages",
                              "context_length_exceeded")

    def _max_tokens(self, num_prompt: int, asked: int | None) -> int:
        room = self.link.max_model_len - num_prompt
        if asked is not None and asked > room or room < 1:
            raise bad_request(f"This model's maximum context length is {self.link.max_model_len} tokens. However, "
                              f"you requested {num_prompt + (asked or 1)} tokens ({num_prompt} in the messages, "
                              f"{asked or 1} in the completion).", "messages", "context_length_exceeded")
        return asked or min(self.config.default_max_tokens, room)

    # ---- phases ----------------------------------------------------------------------------
    def note_tool_calls(self, conv: Conversation, calls: list[dict]):
        conv.tool_wait = ([c["function"]["name"] for c in calls], time.monotonic())

    def enter_io_wait(self, conv: Conversation):
        names, _ = conv.tool_wait
        self._quietly(conv.session.signal_phase, "IO_WAIT", self.durations.expected(names))

    def _leave_io_wait(self, conv: Conversation, brings_results: bool):
        names, since = conv.tool_wait
        if brings_results:
            for name in names:
                self.durations.observe(name, time.monotonic() - since)
        conv.tool_wait = None
        conv.session.signal_phase("ACTIVE")

    # ---- conversations ---------------------------------------------------------------------
    def release(self, conv: Conversation, tokens: list[int] | None, reply_start: int):
        self.table.release(conv, tokens, reply_start)
        if tokens is None:
            self._close([conv])

    def _close(self, convs: list[Conversation]):
        for c in convs:
            self._quietly(c.session.close)

    def expire_loop(self, stop: threading.Event, period_s: float = 5.0):
        while not stop.wait(period_s):
            self._close(self.table.expire())

    @staticmethod
    def _quietly(fn, *args):
        try:
            fn(*args)
        except (DjinnError, ConnectionError, OSError) as e:
            log.warning("%s failed: %s", getattr(fn, "__name__", fn), e)
