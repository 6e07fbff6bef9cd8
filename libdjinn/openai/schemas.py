"""The request bodies the front accepts, as pydantic models: the fields agent frameworks send.
Fields we do not use (user, logprobs=false, parallel_tool_calls, ...) are accepted and ignored."""
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_STOPS = 16                # OpenAI takes 4; the matcher's cost does not grow with them, the caps bound its build
MAX_STOP_CHARS = 256
MAX_SEED = 2**63 - 1          # what the daemon's sampler takes


class Loose(BaseModel):
    model_config = ConfigDict(extra="allow")


class FunctionCall(Loose):
    name: str
    arguments: str | dict = "{}"


class ToolCall(Loose):
    id: str = ""
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(Loose):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict] | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None


class Function(Loose):
    name: str
    description: str | None = None
    parameters: dict | None = None


class Tool(Loose):
    type: Literal["function"] = "function"
    function: Function


class StreamOptions(Loose):
    include_usage: bool = False


class SteerItem(BaseModel):
    """An extension (in extra_body): add scale * vector to decoder `layer`'s output for this request."""
    model_config = ConfigDict(extra="forbid")
    layer: int
    vector: list[float]
    scale: float = 1.0
    positions: Literal["all", "prompt", "generated"] = "all"


class Sampling(Loose):
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, ge=0, le=1)
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Literal[1] = 1
    ignore_eos: bool = False          # an extension, as in vLLM: always generate max_tokens
    steer: list[SteerItem] | None = None   # an extension: steering vectors, checked by the daemon

    @field_validator("stop")
    @classmethod
    def _few_short_stops(cls, stop):
        stops = [stop] if isinstance(stop, str) else stop or []
        if len(stops) > MAX_STOPS or any(len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"at most {MAX_STOPS} stop strings of at most {MAX_STOP_CHARS} characters each")
        return stop

    def stops(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return [s for s in stops if s]

    def daemon_sampling(self, max_tokens: int) -> dict:
        p = {"max_new_tokens": max_tokens, "temperature": self.temperature, "top_p": max(self.top_p, 1e-6),
             "ignore_eos": self.ignore_eos}
        if self.steer:
            p["steer"] = [item.model_dump() for item in self.steer]
        return p | ({"seed": self.seed} if self.seed is not None else {})

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict | None = None

    @field_validator("tool_choice")
    @classmethod
    def _named_choice(cls, choice):
        named = isinstance(choice, dict) and choice.get("type", "function") == "function" \
            and isinstance(choice.get("function"), dict) and isinstance(choice["function"].get("name"), str)
        if isinstance(choice, dict) and not named:
            raise ValueError('a named tool choice is {"type": "function", "function": {"name": "..."}}')
        return choice

    @model_validator(mode="after")
    def _choice_names_a_tool(self):
        if isinstance(self.tool_choice, dict) and self.tools and self.tool_choice["function"]["name"] not in \
                [t.function.name for t in self.tools]:
            raise ValueError(f"tool_choice names {self.tool_choice['function']['name']!r}, which is not in tools")
        return self

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def plain_messages(self) -> list[dict]:
        out = [m.model_dump(exclude_none=True) for m in self.messages]
        return [m | {"role": "system"} if m["role"] == "developer" else m for m in out]

    def plain_tools(self) -> list[dict] | None:
        return [t.model_dump(exclude_none=True) for t in self.tools] if self.tools else None


class CompletionRequest(Sampling):
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)    # OpenAI's default for completions

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens
