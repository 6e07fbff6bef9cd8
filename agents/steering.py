"""Activation steering on the shared, resident model: no weights in this process, no CUDA.

Captures the output of one decoder layer on two contrasting prompts (zero-copy views on this
session's shared memory), takes the difference of their means as a steering vector, and adds it at
that layer while the model answers a third prompt, next to the unsteered answer. Steering and
capture run inside the daemon's batch: no pause, other agents' decoding is not slowed.

    python agents/steering.py --layer 15 --strength 4
"""
import argparse

import libdjinn


def mean_output(djinn, text: str, layer: int):
    """Mean over the prompt's tokens of `layer`'s output (the forward stops there: nothing sampled)."""
    trace = djinn.session().trace(messages=[{"role": "user", "content": text}], capture=[layer], stop_at_layer=layer)
    list(trace)                                      # no breakpoints: it ends at once
    return trace.result.activations[layer].mean(dim=0)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--socket")
    p.add_argument("--layer", type=int, default=15)
    p.add_argument("--strength", type=float, default=4.0)
    p.add_argument("--positive", default="I love this. It is wonderful, happy and great.")
    p.add_argument("--negative", default="I hate this. It is awful, sad and terrible.")
    p.add_argument("--prompt", default="Write one sentence about your weekend.")
    p.add_argument("--max-new-tokens", type=int, default=40)
    a = p.parse_args()
    with libdjinn.connect(a.socket) as djinn:
        direction = mean_output(djinn, a.positive, a.layer) - mean_output(djinn, a.negative, a.layer)
        direction *= a.strength / direction.norm()
        ask = dict(messages=[{"role": "user", "content": a.prompt}], max_new_tokens=a.max_new_tokens)
        for sign, name in ((1, "toward positive"), (-1, "toward negative")):
            steered = djinn.session().generate(**ask, steer={a.layer: sign * direction}, capture=[a.layer])
            rows = tuple(steered.activations[a.layer].shape)
            print(f"[{name}, layer {a.layer}, strength {a.strength}; captured {rows} outputs]\n  {steered.text}\n")
        print(f"[unsteered]\n  {djinn.session().generate(**ask).text}")


if __name__ == "__main__":
    main()
