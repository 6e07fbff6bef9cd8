"""A test agent process: runs jobs given as JSON on argv, prints the results as JSON.
A job is generate kwargs, or {"tool_s": seconds, "expected_s": hint} for a tool call."""
import json
import sys
import time

import libdjinn

socket_path, jobs = sys.argv[1], json.loads(sys.argv[2])
with libdjinn.connect(socket_path) as djinn:
    session = djinn.session()
    results = []
    for job in jobs:
        if "tool_s" in job:
            with session.tool_call(expected_s=job.get("expected_s")):
                time.sleep(job["tool_s"])
            continue
        g = session.generate(**job)
        results.append({"tokens": g.tokens, "text": g.text, "cached_tokens": g.cached_tokens,
                        "finish_reason": g.finish_reason})
print(json.dumps(results))
