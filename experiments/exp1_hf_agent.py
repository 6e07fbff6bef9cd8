"""The baseline agent without Djinn: its own HF transformers model on the GPU, its own KV cache.

    python experiments/exp1_hf_agent.py '{"preset": "llama-2-7b", "device": "cuda", "seed": 1, ...}'

Same turns as experiments/exp1_agent.py (the job's context, growth, new_tokens, tool_s), the
history kept in its own cache across turns (the best case for this setup). Prints one JSON line;
{"oom": true} if its weights or KV did not fit in device memory.
"""
import json
import random
import sys
import time

import torch


def load(preset: str, device: str, dtype):
    from transformers import AutoConfig, AutoModelForCausalLM

    from djinnd.model.presets import PRESETS
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**PRESETS[preset].to_hf())).to(dtype)
    model = model.to_empty(device=device)          # the weights in their dtype only, never fp32 first
    rotary = model.model.rotary_emb                # to_empty left its frequencies unset
    model.model.rotary_emb = type(rotary)(config=model.config).to(device)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, p.shape[-1] ** -0.5)
    return model.eval()


def run(job: dict) -> dict:
    dtype = torch.float16 if job["device"].startswith("cuda") else torch.float32
    model = load(job["preset"], job["device"], dtype)
    rng = random.Random(job["seed"])
    ids = lambda n: [rng.randrange(3, job["vocab"]) for _ in range(n)]  # noqa: E731
    cache, prompt, turns = None, ids(job["context"]), []
    for i in range(len(job["tool_s"]) + 1):
        turn, cache = timed_turn(model, cache, prompt, job["new_tokens"], job["device"])
        turns.append(turn)
        if i < len(job["tool_s"]):
            time.sleep(job["tool_s"][i])
            prompt = ids(job["growth"])
    return {"seed": job["seed"], "turns": turns}


@torch.no_grad()
def timed_turn(model, cache, prompt: list[int], new_tokens: int, device: str):
    started, first, tokens = time.perf_counter(), None, []
    x = torch.tensor([prompt], device=device)
    for _ in range(new_tokens):
        out = model(input_ids=x, past_key_values=cache, use_cache=True)
        cache, token = out.past_key_values, int(out.logits[0, -1].argmax())
        first = first or time.perf_counter()
        tokens.append(token)
        x = torch.tensor([[token]], device=device)
    return {"t": time.time(), "ttft_ms": (first - started) * 1e3,
            "turn_ms": (time.perf_counter() - started) * 1e3, "tokens": tokens}, cache


if __name__ == "__main__":
    try:
        print(json.dumps(run(json.loads(sys.argv[1]))))
    except (torch.OutOfMemoryError, RuntimeError) as e:   # a CUDA context that cannot be made is OOM too
        if not isinstance(e, torch.OutOfMemoryError) and "out of memory" not in str(e):
            raise
        print(json.dumps({"oom": True, "message": str(e)[:200]}))
