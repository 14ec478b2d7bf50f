# The README's two commands: `make run` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
VLP := $(VENV)/bin/vlp
# torch/torchvision pinned as a pair (torchvision must match torch); override for other platforms
TORCH_PKGS ?= torch==2.14.1 torchvision==0.29.1
RUN_DIR ?= runs/clip_digits
DATA ?= data/digits

.PHONY: install run lint test test-fast clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PKGS)
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

# Built-in digits -> train CLIP -> zero-shot eval on held-out digits -> open_clip export.
run: install
	$(VLP) data digits --out $(DATA)
	$(VLP) train configs/quickstart/clip_digits.yaml run.dir=$(RUN_DIR) data.train=$(DATA)/train data.val=$(DATA)/val
	$(VLP) eval zeroshot --checkpoint $(RUN_DIR) --data $(DATA)/val --json | tee $(RUN_DIR)/zeroshot.json
	$(VLP) export --checkpoint $(RUN_DIR) --format open_clip --out $(RUN_DIR)/export_open_clip
	@$(PY) -c "import json; r = json.load(open('$(RUN_DIR)/zeroshot.json')); print(f\"zero-shot top-1 on held-out digits: {r['top1']:.4f} ({r['num_samples']} images)\")"

# ruff (pyflakes, pycodestyle, import order) and the import-linter layers contract (pyproject.toml)
lint: install
	$(VENV)/bin/ruff check vlp tests tools
	$(VENV)/bin/lint-imports

test: lint
	$(PY) -m pytest -q

test-fast: lint
	$(PY) -m pytest -q -m "not slow"

clean:
	rm -rf runs data
