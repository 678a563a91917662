# loracuda — set-up, build and test in one place. `make test` works on a fresh machine.
#
#   make deps    install torch (CUDA build by default) and the test dependencies
#   make build   compile loracuda._C in place (CPU kernels, plus CUDA kernels when a toolkit is found)
#   make test    deps + build + the test suite
#   make demo    deps + build + `loracuda demo`
#
# TORCH_SPEC picks the torch to install: the default is the tested 2.14.1 (CUDA 13 build); 2.13.0 (CPU build)
# is tested too (`make test TORCH_SPEC=torch==2.13.0`); loracuda builds against torch 2.11 or newer.

PYTHON     ?= python3
PIP        ?= $(PYTHON) -m pip
TORCH_SPEC ?= torch==2.14.1
TEST_DEPS  := ninja numpy safetensors pytest hypothesis peft transformers matplotlib trl datasets accelerate
PYTEST_ARGS ?=

# The nvcc on PATH may be a wrapper outside the toolkit; setup.py also resolves it, this is the default.
export CUDA_HOME ?= $(if $(wildcard /usr/local/cuda/bin/nvcc),/usr/local/cuda,)

.PHONY: deps build test demo bench clean

deps:
	$(PIP) install --quiet --disable-pip-version-check "$(TORCH_SPEC)" $(TEST_DEPS)

build: deps
	$(PIP) install --quiet --disable-pip-version-check --no-build-isolation --no-deps -e .

# pytest's exit code 5 means no test was collected: that is a failure here, said in words.
test: build
	@$(PYTHON) -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests; failing." >&2; exit 1; fi; \
	exit $$rc

demo: build
	$(PYTHON) -m loracuda.cli.main demo

bench: build
	$(PYTHON) -m loracuda.cli.main bench --quick

clean:
	rm -rf build dist loracuda/_C*.so *.egg-info
