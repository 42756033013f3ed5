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

.PHONY: venv run train export serve test test-fast docs lint clean

$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[$(EXTRAS)]'
	@touch $(STAMP)

venv: $(STAMP)

## run: build the environment, train on the built-in digits, export (the next version), serve
## (make run PORT=3001 HOST=0.0.0.0 to choose where it listens)
run: export
	$(BIN)/imgclf serve --model $(REPOSITORY)/$(MODEL_NAME) --port $(PORT) --host $(HOST)

train: $(STAMP)
	$(BIN)/imgclf train --dataset digits --output $(RUN_DIR) --force

export: train
	$(BIN)/imgclf export $(RUN_DIR) --repository $(REPOSITORY) --name $(MODEL_NAME) --int8

## serve: serve the newest published version without retraining
serve: $(STAMP)
	$(BIN)/imgclf serve --model $(REPOSITORY)/$(MODEL_NAME) --port $(PORT) --host $(HOST)

## test: build the environment, run the whole suite
test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

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
