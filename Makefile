# The two commands of the README:
#   make demo    the main job: build, start every model, show each answering
#   make check   the tests (unit, integration over loopback, lint, types)
# Both install what they need first when run as root on Debian 12.

PYTHON  ?= /usr/bin/python3
VENV    ?= .venv
TOX     := $(VENV)/bin/tox
APT_DEPS := python3-venv python3-dev gcc libc6-dev make pkg-config libsystemd-dev \
            systemd xinetd socat php-cli php-zmq iproute2

.PHONY: deps venv check test lint type demo clean

deps:
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    missing=$$(for p in $(APT_DEPS); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; done); \
	    if [ -n "$$missing" ]; then \
	        echo "make: installing $$missing"; \
	        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	    fi; \
	else echo "make: not root: assuming these are installed: $(APT_DEPS)"; fi

$(VENV)/bin/activate:
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip 'tox>=4'

venv: deps $(VENV)/bin/activate

check: venv
	$(TOX) -e lint,type,py -- tests --ignore=tests/system

demo: venv
	$(VENV)/bin/pip install -q '.[systemd]'
	$(VENV)/bin/python benchmarks/demo.py

clean:
	rm -rf build dist *.egg-info .tox $(VENV) .coverage .coverage.*
