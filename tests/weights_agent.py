"""A test agent that attaches to djinnd's weights: `hold` reports what it mapped (tensor addresses,
its /proc/self/maps lines for the segment, its ghost logits segment) and waits for stdin to close;
`write` writes into an attached tensor, which the read-only mapping must refuse."""
import json
import os
import sys

import libdjinn

socket_path, mode = sys.argv[1], sys.argv[2]
djinn = libdjinn.connect(socket_path)
weights = djinn.attach_weights()
if mode == "write":
    weights["model.norm.weight"][0] = 123.0
    print("wrote")
    sys.exit(0)
logits = djinn.request("forward", input_ids=[[5, 6, 7]])["logits"]
with open("/proc/self/maps") as fh:
    maps = [line.split() for line in fh if weights.segment in line]
print(json.dumps({"pid": os.getpid(), "segment": weights.segment, "nbytes": weights.nbytes, "maps": maps,
                  "logits_segment": logits["segment"],
                  "tensors": {n: [t.data_ptr(), t.numel() * t.element_size()] for n, t in weights.items()}}),
      flush=True)
sys.stdin.read()
