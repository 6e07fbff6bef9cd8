"""One session of Experiment 3, as its own process: rounds of a generate paused at a breakpoint
(held `pause_s`, as an interpretability tool would while it reads the hidden states), then idle.

    python experiments/exp3_agent.py SOCKET '{"seed": 1, "context": 512, "growth": 32, "new_tokens": 16,
                                               "rounds": 3, "pause_s": 1.0, "idle_s": 1.0, "layer": 20,
                                               "vocab": 32000}'

Prints one JSON line with the tokens of every round.
"""
import json
import random
import sys
import time

import libdjinn


def run(socket_path: str, job: dict) -> dict:
    rng = random.Random(job["seed"])
    ids = lambda n: [rng.randrange(3, job["vocab"]) for _ in range(n)]  # noqa: E731
    rounds, prompt = [], ids(job["context"])
    with libdjinn.connect(socket_path) as djinn:
        s = djinn.session()
        for _ in range(job["rounds"]):
            trace = s.trace(prompt_ids=prompt, breakpoints=[job["layer"]], steps=[0],
                            max_new_tokens=job["new_tokens"], ignore_eos=True)
            for _pause in trace:
                time.sleep(job["pause_s"])       # held at the breakpoint; resumed unedited
            rounds.append(trace.result.tokens)
            time.sleep(job["idle_s"])
            prompt = ids(job["growth"])
        s.close()
    return {"seed": job["seed"], "tokens": rounds}


if __name__ == "__main__":
    try:
        print(json.dumps(run(sys.argv[1], json.loads(sys.argv[2]))))
    except libdjinn.DjinnError as e:
        print(json.dumps({"error": e.code.name, "message": e.message}))
