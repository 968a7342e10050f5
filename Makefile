# Set-up on a fresh machine: `make demo` and `make test` each build .venv on their own.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv demo test test-all test-protobuf7 lint typecheck bench proto proto-check clean

# torch is pinned and installed first so that no dependency pulls a newer build with CUDA packages.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev,flower]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/secure-fl demo

test: $(STAMP)
	$(BIN)/python -m pytest -q
	$(MAKE) --no-print-directory test-protobuf7

# The Flower extra pins protobuf < 7, so .venv runs protobuf 6. A plain install takes protobuf 7:
# .venv-pb7 is .venv with protobuf 7 (and the grpcio-health-checking that needs it) in front, and
# runs the wire tests again there, so the generated code is tested on both runtimes.
PB7 := .venv-pb7
PB7_STAMP := $(PB7)/.installed
$(PB7_STAMP): $(STAMP)
	rm -rf $(PB7)
	$(PYTHON) -m venv $(PB7)
	$(PB7)/bin/pip install --quiet --no-deps 'protobuf>=7.35.1,<8' 'grpcio-health-checking>=1.82'
	$(PB7)/bin/python -c "import site, sys; d = site.getsitepackages()[0]; open(d + '/secure_fl_base.pth', 'w').write('import site; site.addsitedir(' + repr('$(abspath $(VENV))/lib/python%d.%d/site-packages' % sys.version_info[:2]) + ')\n')"
	touch $(PB7_STAMP)

test-protobuf7: $(PB7_STAMP)
	$(PB7)/bin/python -c "import google.protobuf as p; assert p.__version__.startswith('7.'), p.__version__; print('protobuf', p.__version__)"
	$(PB7)/bin/python -m pytest -q -p no:cacheprovider tests/transport/test_transport_wire.py tests/transport/test_transport_federation.py tests/rounds/test_rounds_codec.py

test-all: $(STAMP)
	$(BIN)/python -m pytest -q -m ''

lint: $(STAMP)
	$(BIN)/ruff check secure_fl tests benchmarks examples
	$(BIN)/ruff format --check secure_fl tests benchmarks examples
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/python -m pytest benchmarks -m '' -p no:randomly --benchmark-only --benchmark-columns=min,median,rounds

# Regenerate (or check) secure_fl/transport/_generated from protocols/*.proto.
proto: $(STAMP)
	$(BIN)/python -m secure_fl.transport.codegen

proto-check: $(STAMP)
	$(BIN)/python -m secure_fl.transport.codegen --check

clean:
	rm -rf $(VENV) $(PB7) .pytest_cache .mypy_cache .ruff_cache .benchmarks
