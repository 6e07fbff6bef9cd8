"""A test agent process: runs generate calls given as JSON on argv, prints the results as JSON."""
import json
import sys

import libdjinn

socket_path, jobs = sys.argv[1], json.loads(sys.argv[2])
with libdjinn.connect(socket_path) as djinn:
    session = djinn.session()
    results = []
    for job in jobs:
        g = session.generate(**job)
        results.append({"tokens": g.tokens, "text": g.text, "cached_tokens": g.cached_tokens,
                        "finish_reason": g.finish_reason})
print(json.dumps(results))
