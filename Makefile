# Everything a fresh machine needs is set up by these targets: the Python
# venv with the worker runtime, the Go binaries, and the Go tools used.
SHELL := /bin/bash
PYTHON ?= python3
VENV := python/.venv
VPY := $(VENV)/bin/python
GO ?= go
GOBIN := $(CURDIR)/.tools/bin
NATS_SERVER := $(GOBIN)/nats-server
NATS_CLI := $(GOBIN)/nats
# A server from before message schedules, for test/schedule_oldserver_test.go.
NATS_SERVER_OLD := $(CURDIR)/.tools/nats-server-2.11/nats-server
export PATH := $(GOBIN):$(PATH)

.PHONY: all build venv run test test-go test-py lint bench pgo stress examples proto tools clean ui-screenshot ui-load chromium

all: build

build: bin/poolnode bin/submit bin/pyfleet-init

# pyfleet-init is the init of each worker's PID namespace; poolnode finds
# it beside itself (lifecycle/pidns.go).
bin/poolnode bin/submit bin/pyfleet-init: $(shell find . -name '*.go' -not -path './.tools/*') go.mod go.sum
	$(GO) build -o bin/ ./cmd/poolnode ./cmd/submit ./cmd/pyfleet-init

# The runtime's bytecode is compiled here, as pip does for an installed
# package: an editable install has none, and where PYTHONDONTWRITEBYTECODE
# is set every worker start would compile pyfleet again (about 30 ms of CPU
# each, docs/benchmarks.md). Stale files are ignored by Python's own check.
venv: $(VENV)/.installed
	@$(VPY) -m compileall -q python/pyfleet >/dev/null

$(VENV)/.installed: python/pyproject.toml
	test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q --disable-pip-version-check -e 'python[test]'
	touch $@

# The real nats-server and nats CLI, for tests that need a separate server
# or an outside client.
tools: $(NATS_SERVER) $(NATS_CLI) $(NATS_SERVER_OLD) chromium

# Chromium drives TestUIBrowser (the page of `submit ui`). Installed with
# apt-get where we are root on Debian/Ubuntu; elsewhere the test fails
# saying how to install it (or set PYFLEET_TEST_CHROMIUM).
chromium:
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || command -v google-chrome >/dev/null || \
	  { if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then apt-get install -y chromium; \
	    else echo "chromium not found: install it (sudo apt-get install chromium) for TestUIBrowser"; fi; }

$(NATS_SERVER):
	GOBIN=$(GOBIN) $(GO) install github.com/nats-io/nats-server/v2@v2.15.2

$(NATS_SERVER_OLD):
	GOBIN=$(dir $@) $(GO) install github.com/nats-io/nats-server/v2@v2.11.17

$(NATS_CLI):
	GOBIN=$(GOBIN) $(GO) install github.com/nats-io/natscli/nats@v0.5.0

run: venv build
	bin/poolnode --listen 127.0.0.1:4222

lint:
	@out=$$(gofmt -l $$(git ls-files '*.go')); if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi
	$(GO) vet ./...

test: venv build tools lint test-py test-go

test-py: venv build
	cd python && .venv/bin/python -m pytest -q

test-go: venv build tools
	PYFLEET_TEST_PYTHON=$(CURDIR)/$(VPY) $(GO) test -race -count=1 -timeout 20m ./...

stress: venv build tools
	PYFLEET_TEST_PYTHON=$(CURDIR)/$(VPY) PYFLEET_STRESS=1 $(GO) test -race -count=1 -timeout 60m -run Stress ./test/

bench: venv build tools
	$(VPY) -m pip install -q --disable-pip-version-check -e 'python[bench]'
	PYFLEET_TEST_PYTHON=$(CURDIR)/$(VPY) $(GO) run ./test/bench

# Regenerates cmd/poolnode/default.pgo, the profile go build uses for
# profile-guided optimization of poolnode (-pgo=auto): CPU profiles of a
# node built without it, under the request/reply and one-at-a-time loads of
# make bench, merged. Commit the result; docs/benchmarks.md says what it gains.
pgo: venv build tools
	rm -rf .pgo-profiles
	PYFLEET_TEST_PYTHON=$(CURDIR)/$(VPY) $(GO) run ./test/bench -sections rr,c1 -rounds 1 -out '' -pgo off -profile .pgo-profiles
	$(GO) tool pprof -proto .pgo-profiles/*-poolnode.pprof > cmd/poolnode/default.pgo
	rm -rf .pgo-profiles

# docs/ui.png: TestUIBrowser's page of `submit ui` with a few nodes under load.
ui-screenshot: venv build tools
	PYFLEET_TEST_PYTHON=$(CURDIR)/$(VPY) PYFLEET_UI_SCREENSHOT=$(CURDIR)/docs/ui.png $(GO) test -count=1 -run TestUIBrowser ./test/

# TestUIHundredWorkers: the page of a node with 100 workers under load.
ui-load: venv build tools
	PYFLEET_TEST_PYTHON=$(CURDIR)/$(VPY) PYFLEET_UI_LOAD=1 $(GO) test -count=1 -v -timeout 20m -run TestUIHundredWorkers ./test/

# The five examples in examples/, each against a node of its own on a
# random port (concurrent with 100 workers; TestExamples runs 8): one line
# each with its figure and the processes its node left, which must be 0.
examples: venv build
	PYFLEET_TEST_PYTHON=$(CURDIR)/$(VPY) $(GO) run ./test/examples

# Regenerates the committed gRPC code; needs grpcio-tools and the Go plugins.
proto: venv
	$(VPY) -m pip install -q --disable-pip-version-check grpcio-tools==1.85.1
	GOBIN=$(GOBIN) $(GO) install google.golang.org/protobuf/cmd/protoc-gen-go@v1.36.11
	GOBIN=$(GOBIN) $(GO) install google.golang.org/grpc/cmd/protoc-gen-go-grpc@v1.6.2
	$(VPY) -m grpc_tools.protoc -Iproto \
		--go_out=proto/workerpb --go_opt=paths=source_relative \
		--go-grpc_out=proto/workerpb --go-grpc_opt=paths=source_relative \
		--python_out=python/pyfleet/_proto --pyi_out=python/pyfleet/_proto \
		--grpc_python_out=python/pyfleet/_proto proto/worker.proto
	sed -i 's/^import worker_pb2 as worker__pb2/from . import worker_pb2 as worker__pb2/' python/pyfleet/_proto/worker_pb2_grpc.py

clean:
	rm -rf bin .tools $(VENV)
