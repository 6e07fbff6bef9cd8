"""Activation steering on the shared, resident model: no weights in this process, no CUDA.

Reads the hidden states of two contrasting prompts after one decoder layer, takes the difference
of their means as a steering vector, and adds it at that layer while the model answers a third
prompt, next to the unsteered answer.

    python agents/steering.py --layer 15 --strength 4
"""
import argparse

import libdjinn


def mean_hidden(session, text: str, layer: int):
    """Mean over tokens of the output of `layer` on the prompt's forward."""
    for bp in session.trace(messages=[{"role": "user", "content": text}], breakpoints=[layer], max_new_tokens=1):
        mean = bp.hidden.mean(dim=0)                # a new tensor: the view itself ends at resume
    return mean


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
        probe = djinn.session()
        direction = mean_hidden(probe, a.positive, a.layer) - mean_hidden(djinn.session(), a.negative, a.layer)
        direction *= a.strength / direction.norm()

        def steer(bp):
            bp.hidden.add_(direction)               # in place, on the daemon's shared memory

        plain = djinn.session().chat(a.prompt, max_new_tokens=a.max_new_tokens)
        for sign, name in ((1, "toward positive"), (-1, "toward negative")):
            direction *= sign
            steered = djinn.session().generate(messages=[{"role": "user", "content": a.prompt}],
                                               max_new_tokens=a.max_new_tokens, hooks={a.layer: steer},
                                               hook_steps="all")
            direction *= sign
            print(f"[{name}, layer {a.layer}, strength {a.strength}]\n  {steered.text}\n")
        print(f"[unsteered]\n  {plain.text}")


if __name__ == "__main__":
    main()
