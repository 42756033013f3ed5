# The two commands a new user needs: `make run` and `make test`. Both build .venv when missing.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
EXTRAS ?= train,serve,ray,dev

RUN_DIR ?= runs/digits
REPOSITORY ?= model_repository
MODEL_NAME ?= digits
PORT ?= 3000
HOST ?= 127.0.0.1

.PHONY: venv run port-free train export serve image test test-durations test-fast test-container docs lint clean clean-test-cache

# uv (pinned in constraints.txt: BentoML's build runs it too) installs the same environment as
# pip from the same constraints, downloading and compiling in parallel: 41 s instead of pip's
# 77 s on a clean 2-core machine (2026-12-06). Compiled at install, as pip does: where
# PYTHONDONTWRITEBYTECODE is set, nothing compiles later, and TensorFlow's import took 12 s
# from source instead of 5.
$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "$$(grep '^uv==' constraints.txt)"
	$(BIN)/uv pip install --quiet --compile-bytecode --python $(BIN)/python -c constraints.txt \
		-e '.[$(EXTRAS)]'
	@touch $(STAMP)

venv: $(STAMP)

# What a finished training run and its export leave behind: `make run` redoes neither while
# they are newer than what made them (the environment, the training code).
TRAINED := $(RUN_DIR)/metrics.json
EXPORTED := $(REPOSITORY)/.make/$(MODEL_NAME).exported
TRAINING_CODE := $(wildcard training/*.py)

## run: build the environment, check the port, train on the built-in digits and export (the
## next version) unless done already, serve (make run PORT=3001 HOST=0.0.0.0 to choose where)
run: port-free $(EXPORTED)
	$(BIN)/imgclf serve --model $(REPOSITORY)/$(MODEL_NAME) --port $(PORT) --host $(HOST)

# One line and a non-zero exit, before minutes of training, when another server holds the port.
port-free: $(STAMP)
	@$(BIN)/python -m serving.web.serve_command $(HOST) $(PORT)

$(TRAINED): $(STAMP) $(TRAINING_CODE)
	$(BIN)/imgclf train --dataset digits --output $(RUN_DIR) --force

$(EXPORTED): $(TRAINED)
	$(BIN)/imgclf export $(RUN_DIR) --repository $(REPOSITORY) --name $(MODEL_NAME) --int8
	@mkdir -p $(@D) && touch $@

## train: train again, whatever is there
train: $(STAMP)
	$(BIN)/imgclf train --dataset digits --output $(RUN_DIR) --force

## export: publish the run as the next version (training it first if it never finished)
export: $(TRAINED)
	$(BIN)/imgclf export $(RUN_DIR) --repository $(REPOSITORY) --name $(MODEL_NAME) --int8
	@mkdir -p $(dir $(EXPORTED)) && touch $(EXPORTED)

## serve: serve the newest published version without retraining
serve: $(STAMP)
	$(BIN)/imgclf serve --model $(REPOSITORY)/$(MODEL_NAME) --port $(PORT) --host $(HOST)

## image: the service's container image (bentoml build + containerize); on machines that
## cannot pull images: make image BASE_IMAGE=localhost/debian-py311:bookworm (see docs/deployment.md)
image: $(STAMP)
	$(BIN)/python container/build_image.py $(if $(BASE_IMAGE),--base-image $(BASE_IMAGE))

## test: build the environment, run the whole suite (the container tests: make test-container):
## on TEST_WORKERS processes, then the timing-sensitive tests alone
TEST_WORKERS ?= 2
# One BLAS thread per process: two pytest processes and the servers, exports and training runs
# they start already share the 2 cores, and OpenBLAS's spinning threads doubled the CPU of the
# exports' small matrix work (calibration: 9.2 s of CPU instead of 4.3) without shortening it.
test: export OPENBLAS_NUM_THREADS = 1
# The project's own modules compiled once, not in each of the suite's few hundred processes
# (0.12 s each), where the machine sets PYTHONDONTWRITEBYTECODE (empty is unset for Python).
test: export PYTHONDONTWRITEBYTECODE =
test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -m "not container and not serial" -n $(TEST_WORKERS) --dist loadfile \
		--no-loadscope-reorder
	$(BIN)/python -m pytest -m "serial and not container"

## test-container: build the image with podman and test it as a deployer runs it (as root, with
## podman, runc and debootstrap; on machines like CI's: CONTAINERS_CONF=container/containers.conf)
test-container: $(STAMP)
	$(BIN)/python -m pytest -m container

## test-durations: make test, then tests/durations.json (the order make test hands out files:
## longest first) from what each file took
test-durations:
	IMGCLF_RECORD_DURATIONS=1 $(MAKE) test

## test-fast: the quick subset for day-to-day work (no training, no real servers)
test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow"

## docs: regenerate docs/reference/ from the code (a test fails when they differ)
docs: $(STAMP)
	$(BIN)/python -m imgclf.reference

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf runs $(REPOSITORY) .pytest_cache .ruff_cache

## clean-test-cache: forget the data sets, runs and models the tests keep between runs
clean-test-cache:
	rm -rf $${IMGCLF_TEST_CACHE:-$$HOME/.cache/imgclf/tests}
