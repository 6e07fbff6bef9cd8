"""A tool-using agent: ask the model, run a tool while the daemon knows we are waiting on it,
feed the tool's result back into the same session (its KV stays in the daemon), ask again.

    python agents/tool_agent.py --task "What is 17 * 23?"

Copy this loop for your own agent: the daemon holds the model and every session's KV cache,
so this process needs no GPU, no CUDA context and no weights.
"""
import argparse
import ast
import json
import operator
import re
import time

import libdjinn

OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def calculator(expression: str) -> str:
    """The tool: evaluates + - * / on numbers, nothing else (no eval of model output)."""
    def ev(node):
        if isinstance(node, ast.BinOp) and type(node.op) in OPS:
            return OPS[type(node.op)](ev(node.left), ev(node.right))
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return node.value
        raise ValueError(f"not arithmetic: {expression!r}")
    return str(ev(ast.parse(expression, mode="eval").body))


def run(task: str, socket_path: str | None, max_new_tokens: int, tool_seconds: float) -> dict:
    with libdjinn.connect(socket_path) as djinn:
        session = djinn.session()
        first = session.chat(f"{task} Think about which calculation is needed.", max_new_tokens=max_new_tokens)
        expression = re.search(r"\d[\d\s.+\-*/()]*\d", task).group(0)
        with session.tool_call(expected_s=tool_seconds, tool="calculator"):   # our KV may be paged out meanwhile
            time.sleep(tool_seconds)                          # a real tool would be slow I/O
            result = calculator(expression)
        final = session.chat(f"The calculator says {expression} = {result}. State the answer in one sentence.",
                             max_new_tokens=max_new_tokens)
        session.close()
    return {"task": task, "thought": first.text, "tool": {"calculator": expression, "result": result},
            "answer": final.text, "history_reused_tokens": final.cached_tokens}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", default="What is 17 * 23?")
    p.add_argument("--socket", default=None)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--tool-seconds", type=float, default=0.5)
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    out = run(a.task, a.socket, a.max_new_tokens, a.tool_seconds)
    if a.json:
        print(json.dumps(out))
    else:
        print(f"task:    {out['task']}\nthought: {out['thought']}\ntool:    {out['tool']}\nanswer:  {out['answer']}")


if __name__ == "__main__":
    main()
