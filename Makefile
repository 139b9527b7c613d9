# Two commands for a fresh machine: `make test` and `make demo`. Both create .venv when it is missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test demo clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch/torchvision: these exact versions install from the local disk on the project's machines;
# elsewhere pip picks what the ranges in pyproject.toml allow.
$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "torch==2.14.1" "torchvision==0.29.1" || $(BIN)/pip install -q torch torchvision
	$(BIN)/pip install -q -e ".[test,lite,export,openvino,tensorboard,serve,video,polygons]"
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || command -v google-chrome >/dev/null \
	  || echo "note: no Chromium found, so the tests that open pages in a browser (tests/viz/test_browse.py," \
	          "tests/app/test_serve_page.py, tests/data/test_check_page.py) will skip; to run them install one:" \
	          "sudo apt-get install chromium (Debian/Ubuntu), sudo dnf install chromium (Fedora)," \
	          "brew install --cask chromium (macOS); .ci/run installs it and requires it"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder

demo: $(STAMP)
	$(BIN)/maskrcnn demo

clean:
	rm -rf $(VENV) runs .pytest_cache
