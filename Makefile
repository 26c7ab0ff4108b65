# The two commands of the README:
#   make demo    the main job: build, start every model, print the talk's two tables (myecho-bench --quick)
#   make check   the tests (unit, integration over loopback, lint, types; the
#                ZeroMQ/systemd ones again on Debian's python3-zmq), then
#                the Debian package (built, lintian-clean) in a booted systemd
# Both install what they need first when run as root on Debian 12.
# Also: make deb (dist/: the packages myecho and myecho-bench, the source
#       package; then lintian), make lintian,
#       make system (the system tests alone, on the packages make deb built).

PYTHON  ?= /usr/bin/python3
VENV    ?= .venv
TOX     := $(VENV)/bin/tox
APT_DEPS := python3-venv python3-dev gcc libc6-dev make pkg-config libsystemd-dev \
            libzmq3-dev systemd xinetd socat php-cli php-zmq redis-tools iproute2 \
            bash-completion man-db python3-zmq python3-systemd python3-uvloop

# The package: its version from debian/changelog (no dpkg-dev needed yet).
DEB_VERSION := $(shell sed -n '1s/^[^(]*(\([^)]*\)).*/\1/p' debian/changelog)
DEB_ARCH    := $(shell dpkg --print-architecture)
DEBS        := dist/myecho_$(DEB_VERSION)_$(DEB_ARCH).deb dist/myecho-bench_$(DEB_VERSION)_$(DEB_ARCH).deb
DSC         := dist/myecho_$(DEB_VERSION).dsc
# The system tests install the packages MYECHO_DEB names (space-separated).
MYECHO_DEB  := $(foreach deb,$(DEBS),$(CURDIR)/$(deb))

.PHONY: deps venv check test lint type demo clean deb deb-deps lintian system

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
	$(TOX) -e debian
	$(MAKE) --no-print-directory deb
	MYECHO_DEB="$(MYECHO_DEB)" $(TOX) -e system

# The system tests alone (boot Debian 12 containers; root), on the built .deb.
system: venv deb
	MYECHO_DEB="$(MYECHO_DEB)" $(TOX) -e system

# Build dependencies from debian/control: apt-get build-dep when root.
deb-deps:
	@if command -v dpkg-checkbuilddeps >/dev/null && dpkg-checkbuilddeps 2>/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "make: installing the build dependencies of debian/control"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	        apt-get build-dep -y -qq --no-install-recommends ./ >/dev/null; \
	else dpkg-checkbuilddeps; fi

# dist/: myecho and myecho-bench (.deb) and the source package (.dsc), built
# in a scratch copy of the tree, then lintian.
deb: deb-deps
	tools/build-deb dist
	@$(MAKE) --no-print-directory lintian

# No error, no warning allowed; info, pedantic and experimental tags are
# shown (debian/source/lintian-overrides says why each override is there).
lintian:
	@command -v lintian >/dev/null || { [ "$$(id -u)" = 0 ] && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends lintian >/dev/null; }
	lintian --fail-on error,warning --display-info --pedantic --display-experimental $(DEBS) $(DSC)

demo: venv
	$(VENV)/bin/pip install -q '.[systemd,bench]'
	$(VENV)/bin/myecho-bench --quick --talk --charts bench-charts

clean:
	rm -rf build dist *.egg-info .tox $(VENV) .coverage .coverage.* .pybuild
