# One command to install, one to test, one to run the demo.  See README.md.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
WORKDIR ?= workdirs/mnist
TEXT_WORKDIR ?= workdirs/mnist_text

.PHONY: venv test lint demo text-demo clean

venv: $(STAMP)

$(STAMP): requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check --no-deps -r requirements.lock
	touch $(STAMP)

lint: venv
	$(BIN)/ruff check .

test: venv lint
	$(BIN)/python -m pytest

demo: venv
	$(BIN)/python main.py --config=configs/mnist.py --workdir=$(WORKDIR) --mode=train
	$(BIN)/python main.py --config=configs/mnist.py --workdir=$(WORKDIR) --mode=sample

# Text to image on the same digits: trains on captions, then draws configs/mnist_text_prompts.txt.
text-demo: venv
	$(BIN)/python main.py --config=configs/mnist_text.py --workdir=$(TEXT_WORKDIR) --mode=train
	$(BIN)/python main.py --config=configs/mnist_text.py --workdir=$(TEXT_WORKDIR) --mode=sample

clean:
	rm -rf $(VENV) workdirs
