"""Tool calls in text: OpenAI messages and tools rendered through the model's chat template, and the
model's text parsed back into OpenAI `tool_calls`.

Formats, by the model's own template (`call_style`):
- hermes (Qwen2.5, Qwen3, Hermes): `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`;
- json (Llama 3.1/3.2/3.3): a bare `{"name": ..., "parameters": {...}}` object (or a list of them);
- fallback: a template without tool support (SmolLM2's) gets the tools in a system prompt, assistant
  tool calls as hermes text, and tool results as user messages wrapped in `<tool_response>`
  (FALLBACK_SYSTEM below is the whole convention).
Replies are parsed for either format whatever the style.
"""
import json
import re
import uuid

OPEN, CLOSE = "<tool_call>", "</tool_call>"
FALLBACK_SYSTEM = ("You may call functions to help with the user's request. The functions are listed in "
                   "<tools></tools> as JSON schemas:\n<tools>\n{tools}\n</tools>\nTo call a function, reply with "
                   "one line per call:\n<tool_call>\n{{\"name\": <function-name>, \"arguments\": <args-json-object>}}"
                   "\n</tool_call>\nFunction results come back inside <tool_response></tool_response>.")
_CALL = re.compile(re.escape(OPEN) + r"\s*(.*?)\s*(?:" + re.escape(CLOSE) + r"|$)", re.DOTALL)


def template_has_tools(tokenizer) -> bool:
    return "tools" in _template(tokenizer)


def call_style(tokenizer) -> str:
    """hermes, json or fallback: how this model's template writes tool calls."""
    if not template_has_tools(tokenizer):
        return "fallback"
    return "hermes" if OPEN in _template(tokenizer) else "json"


def _template(tokenizer) -> str:
    template = getattr(tokenizer, "chat_template", None) or ""
    return template if isinstance(template, str) else str(template)


def content_text(content) -> str:
    """OpenAI content: a string, None, or a list of parts of which we use the text ones."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")


def call_text(call: dict) -> str:
    fn = call["function"]
    return f'{OPEN}\n{{"name": {json.dumps(fn["name"])}, "arguments": {_arguments_json(fn.get("arguments"))}}}\n{CLOSE}'


def _arguments_json(arguments) -> str:
    if isinstance(arguments, str):
        try:
            return json.dumps(json.loads(arguments))
        except ValueError:
            return json.dumps(arguments)
    return json.dumps(arguments or {})


def render(tokenizer, messages: list[dict], tools: list | None) -> str:
    """The prompt text of a conversation, ending with the assistant's generation prompt."""
    if tools and template_has_tools(tokenizer):
        return tokenizer.apply_chat_template(_native(messages), tools=tools, add_generation_prompt=True,
                                             tokenize=False)
    return tokenizer.apply_chat_template(_fallback(messages, tools), add_generation_prompt=True, tokenize=False)


def _native(messages: list[dict]) -> list[dict]:
    """Messages as HF templates with tool support expect them (arguments as objects)."""
    out = []
    for m in messages:
        m = {**m, "content": content_text(m.get("content"))}
        if m.get("tool_calls"):
            m["tool_calls"] = [{**c, "function": {**c["function"], "arguments": json.loads(
                _arguments_json(c["function"].get("arguments")))}} for c in m["tool_calls"]]
        out.append(m)
    return out


def _fallback(messages: list[dict], tools: list | None) -> list[dict]:
    out = []
    for m in messages:
        text = content_text(m.get("content"))
        if m["role"] == "assistant" and m.get("tool_calls"):
            text = "\n".join(([text] if text else []) + [call_text(c) for c in m["tool_calls"]])
        if m["role"] == "tool":
            out.append({"role": "user", "content": f"<tool_response>\n{text}\n</tool_response>"})
        else:
            out.append({"role": m["role"], "content": text})
    if tools:
        system = FALLBACK_SYSTEM.format(tools="\n".join(json.dumps(t) for t in tools))
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": out[0]["content"] + "\n\n" + system}
        else:
            out.insert(0, {"role": "system", "content": system})
    return out


def forced_prefix(tool_choice, tokenizer=None) -> str:
    """Text the assistant turn starts with so that it is a tool call (a named function, or any), in
    the model's own format."""
    if tool_choice != "required" and not isinstance(tool_choice, dict):
        return ""
    json_style = tokenizer is not None and call_style(tokenizer) == "json"
    opening, args_key = ("", "parameters") if json_style else (f"{OPEN}\n", "arguments")
    if isinstance(tool_choice, dict):
        return f'{opening}{{"name": {json.dumps(tool_choice["function"]["name"])}, "{args_key}": '
    return f'{opening}{{"name": "'


def call_end(forced: str, text: str) -> int | None:
    """Where in `text`, the reply after the `forced` start, the forced call is complete (if it is)."""
    if CLOSE in text:
        return text.index(CLOSE) + len(CLOSE)
    if forced.startswith("{"):               # json style: the object closes
        try:
            return json.JSONDecoder().raw_decode(forced + text)[1] - len(forced)
        except ValueError:
            return None
    return None


def parse(text: str, forced: str = "") -> tuple[str | None, list[dict]]:
    """(content, tool_calls) of a reply; `forced` is the prefix the turn was started with."""
    full = forced + text
    calls = [c for body in _CALL.findall(full) if (c := _call(body))]
    if not calls and full.strip()[:1] in "{[" and full.strip():
        calls = _plain_json(full.strip())
    if not calls and forced:
        calls = [c for c in [_lenient(full)] if c]
    if not calls:
        return text, []
    content = full.split(OPEN, 1)[0].strip() if OPEN in full else ""
    return content or None, calls


def _call(body: str) -> dict | None:
    try:
        obj = json.loads(body)
    except ValueError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": obj["name"], "arguments": args if isinstance(args, str) else json.dumps(args)}}


def _plain_json(text: str) -> list[dict]:
    try:
        obj = json.loads(text)
    except ValueError:
        return []
    items = obj if isinstance(obj, list) else [obj]
    calls = [_call(json.dumps(o)) for o in items if isinstance(o, dict)]
    return calls if calls and all(calls) else []


def _lenient(full: str) -> dict | None:
    """A forced call whose JSON did not close: the name, and the arguments as the raw text after them
    (OpenAI documents that arguments may not be valid JSON)."""
    m = re.match(r'(?:' + re.escape(OPEN) + r')?\s*\{"name":\s*"([^"]+)"(?:,\s*"(?:arguments|parameters)":\s*)?(.*)',
                 full, re.DOTALL)
    if not m:
        return None
    raw = m.group(2).split(CLOSE, 1)[0].rstrip()
    raw = raw[:-1].rstrip() if raw.endswith("}") and raw.count("{") < raw.count("}") else raw
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": m.group(1), "arguments": raw or "{}"}}
