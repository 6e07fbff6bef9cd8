"""Tool calls in text: OpenAI messages and tools rendered through the model's chat template, and the
model's text parsed back into OpenAI `tool_calls`.

Format: Hermes/Qwen style, `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, with a plain
JSON object (or list of them) as a fallback. A template without tool support (SmolLM2's) gets the
tools in a system prompt, assistant tool calls as that text, and tool results as user messages
wrapped in `<tool_response>` (FALLBACK_SYSTEM below is the whole convention).
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
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else str(tokenizer.chat_template)
    return "tools" in template


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


def forced_prefix(tool_choice) -> str:
    """Text the assistant turn starts with so that it is a tool call: a named function, or any."""
    if isinstance(tool_choice, dict):
        return f'{OPEN}\n{{"name": {json.dumps(tool_choice["function"]["name"])}, "arguments": '
    return f'{OPEN}\n{{"name": "' if tool_choice == "required" else ""


def parse(text: str, forced: str = "") -> tuple[str | None, list[dict]]:
    """(content, tool_calls) of a reply; `forced` is the prefix the turn was started with."""
    full = forced + text
    calls = [c for body in _CALL.findall(full) if (c := _call(body))]
    if not calls and forced:
        calls = [c for c in [_lenient(full)] if c]
    if not calls and full.strip()[:1] in "{[" and full.strip():
        calls = _plain_json(full.strip())
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
    m = re.match(re.escape(OPEN) + r'\s*\{"name":\s*"([^"]+)"(?:,\s*"arguments":\s*)?(.*)', full, re.DOTALL)
    if not m:
        return None
    raw = m.group(2).split(CLOSE, 1)[0].rstrip()
    raw = raw[:-1].rstrip() if raw.endswith("}") and raw.count("{") < raw.count("}") else raw
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": m.group(1), "arguments": raw or "{}"}}
