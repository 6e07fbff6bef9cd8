"""One agent of Experiment 1's long-context profile, as its own process: sessions of turns
(generate -> tool call -> tool result appended) whose context grows until it would pass
`max_context`, then a new session; until the run's deadline, `max_turns` turns or `sessions`
conversations (0: no limit).

    python experiments/exp1_long_agent.py SOCKET '{"seed": 1, "vocab": 128256, "context": 8192,
        "new_tokens": 200, "growth": [1024, 4096], "max_context": 65536, "tool_median_s": 4.0,
        "tool_sigma": 1.0, "tool_cap_s": 30.0, "time_scale": 1.0, "hints": true, "tool": "tool",
        "until": 1765000000.0, "max_turns": 0, "sessions": 0, "keep_tokens": false, "shared_prompt": [0, 4096]}'

Every draw (prompt ids, tool durations, result sizes) comes from one generator seeded by `seed`,
so each policy sees the same agent for as many turns as it runs. A first prompt starts with the
run's shared system prompt (`shared_prompt`: [seed, tokens], the same ids for every agent), if any. Prints one JSON line: per turn
its start, the context it resumed, TTFT as the agent saw it, its duration, its tokens (or their
hash) and, if the daemon refused it, the error; a refused turn ends its session.
"""
import hashlib
import itertools
import json
import random
import signal
import sys
import time

import libdjinn


class Draws:
    """The agent's random choices, in the order it makes them."""

    def __init__(self, job: dict):
        self.job, self.rng = job, random.Random(job["seed"])
        seed, n = job.get("shared_prompt") or (0, 0)
        shared = random.Random(f"shared-prompt-{seed}")     # not any agent's own stream
        self.system = [shared.randrange(3, job["vocab"]) for _ in range(n)]

    def first_prompt(self) -> list[int]:
        return self.system + self.ids(self.job["context"] - len(self.system))

    def ids(self, n: int) -> list[int]:
        return [self.rng.randrange(3, self.job["vocab"]) for _ in range(n)]

    def tool_s(self) -> float:
        j = self.job
        return min(j["tool_cap_s"], j["tool_median_s"] * self.rng.lognormvariate(0, j["tool_sigma"])) * j["time_scale"]

    def result_tokens(self) -> int:
        return self.rng.randint(*self.job["growth"])


def run(socket_path: str, job: dict) -> dict:
    draws, turns = Draws(job), []
    signal.signal(signal.SIGTERM, stop)     # the harness's hard deadline: report what ran
    try:
        with libdjinn.connect(socket_path) as djinn:
            for index in itertools.count():
                if time.time() >= job["until"] or job["sessions"] and index >= job["sessions"] or \
                        job["max_turns"] and len(turns) >= job["max_turns"]:
                    break
                if not one_session(djinn, job, draws, turns, index):
                    break
    except Stopped:
        return {"seed": job["seed"], "turns": turns, "cut": True}
    return {"seed": job["seed"], "turns": turns}


class Stopped(Exception):
    pass


STOPPING = False


def stop(*_):
    global STOPPING
    STOPPING = True
    raise Stopped


def one_session(djinn, job: dict, draws: Draws, turns: list, index: int) -> bool:
    """Turns on one session until its context is full; False: the run is over for this agent."""
    s, prompt, history = djinn.session(), draws.first_prompt(), 0
    try:
        for k in itertools.count():
            turn = timed_turn(s, prompt, history, job)
            turns.append(turn | {"session": index, "turn": k})
            if "error" in turn:
                return True             # refused: a fresh session goes on
            history += len(prompt) + turn["n"]
            tool_s, prompt = draws.tool_s(), draws.ids(draws.result_tokens())
            if job["max_turns"] and len(turns) >= job["max_turns"] or time.time() + tool_s >= job["until"]:
                return False
            with s.tool_call(expected_s=tool_s if job["hints"] else None, tool=job.get("tool")):
                time.sleep(tool_s)
            if history + len(prompt) + job["new_tokens"] > job["max_context"]:
                return True             # this conversation is done; the next begins
    finally:
        if not STOPPING:        # mid-stream, a close would wait on the cut stream's replies
            s.close()


def timed_turn(s, prompt: list[int], history: int, job: dict) -> dict:
    started, first, tokens = time.perf_counter(), None, []
    out = {"t": time.time(), "context": history + len(prompt), "prompt": len(prompt)}
    try:
        for event in s.stream(prompt_ids=prompt, max_new_tokens=job["new_tokens"], ignore_eos=True):
            first = first or time.perf_counter()
            tokens.append(event.token)
    except libdjinn.DjinnError as e:
        return out | {"error": e.code.name, "message": e.message[:300], "n": 0}
    done = time.perf_counter()
    kept = tokens if job.get("keep_tokens") else hashlib.sha1(repr(tokens).encode()).hexdigest()[:12]
    return out | {"ttft_ms": (first - started) * 1e3, "turn_ms": (done - started) * 1e3, "n": len(tokens),
                  "tokens": kept}


if __name__ == "__main__":
    print(json.dumps(run(sys.argv[1], json.loads(sys.argv[2]))))
