"""A client process for the djinn-openai tests: one chat request over plain HTTP (urllib: 20 of these
start at once on a small machine, and the openai package takes seconds to import); prints the reply."""
import json
import sys
import urllib.request

base_url, prompt = sys.argv[1], sys.argv[2]
body = {"model": "djinn", "messages": [{"role": "user", "content": prompt}], "max_tokens": 6, "temperature": 0}
request = urllib.request.Request(base_url + "/chat/completions", json.dumps(body).encode(),
                                 {"content-type": "application/json"})
with urllib.request.urlopen(request, timeout=240) as reply:
    r = json.load(reply)
print(json.dumps({"content": r["choices"][0]["message"]["content"], "finish_reason": r["choices"][0]["finish_reason"],
                  "completion_tokens": r["usage"]["completion_tokens"]}))
