"""One agent of Experiment 1, as its own process: turns of generate -> tool call (sleep) -> resume.

    python experiments/exp1_agent.py SOCKET '{"seed": 1, "context": 1024, "growth": 64, "new_tokens": 32,
                                               "tool_s": [12.5, 17.0], "hints": true, "tool": "search",
                                               "vocab": 32000}'

The first prompt is `context` random token ids, each later turn appends `growth` more (the tool's
result) to the session's resident history. Prints one JSON line: per turn the time to first token
as the agent saw it (queue, restore and prefill included), the turn's duration and its tokens.
"""
import json
import random
import sys
import time

import libdjinn


def run(socket_path: str, job: dict) -> dict:
    rng = random.Random(job["seed"])
    ids = lambda n: [rng.randrange(3, job["vocab"]) for _ in range(n)]  # noqa: E731
    turns, prompt = [], ids(job["context"])
    with libdjinn.connect(socket_path) as djinn:
        s = djinn.session()
        for i in range(len(job["tool_s"]) + 1):
            turns.append(timed_turn(s, prompt, job["new_tokens"]))
            if i < len(job["tool_s"]):
                tool_s = job["tool_s"][i]
                with s.tool_call(expected_s=tool_s if job["hints"] else None, tool=job.get("tool")):
                    time.sleep(tool_s)
                prompt = ids(job["growth"])
        s.close()
    return {"seed": job["seed"], "turns": turns}


def timed_turn(s, prompt: list[int], new_tokens: int) -> dict:
    started, first, tokens = time.perf_counter(), None, []
    for event in s.stream(prompt_ids=prompt, max_new_tokens=new_tokens, ignore_eos=True):
        first = first or time.perf_counter()
        tokens.append(event.token)
    done = time.perf_counter()
    return {"t": time.time(), "ttft_ms": (first - started) * 1e3, "turn_ms": (done - started) * 1e3,
            "tokens": tokens}


if __name__ == "__main__":
    try:
        print(json.dumps(run(sys.argv[1], json.loads(sys.argv[2]))))
    except libdjinn.DjinnError as e:
        print(json.dumps({"error": e.code.name, "message": e.message}))
