# The README's first two commands: `make demo` and `make test`. Both create .venv/ first if needed.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
FOUNDRY := $(VENV)/bin/foundry
# The Python standard library's own .py files: real code, present on every machine, written by no one here.
STDLIB := $(shell python3 -c "import sysconfig; print(sysconfig.get_paths()['stdlib'])")
DEMO := data/demo

.PHONY: install demo demo-data demo-eval test lint format bench clean

install: $(VENV)/.installed

# torch is left to pip (the registry's CUDA build, which runs on CPUs): mosaicml-streaming imports
# torchvision, whose extension needs that build. Do not pin a CPU-only torch wheel here.
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

demo-data: install
	@test -f $(DEMO)/tokenizer/tokenizer.json || $(FOUNDRY) data-prep tokenizer $(STDLIB) --glob '*.py' \
		--exclude 'site-packages/*' --out $(DEMO)/tokenizer --vocab-size 4096
	$(FOUNDRY) data-prep text $(STDLIB) --glob '*.py' --exclude 'site-packages/*' --out $(DEMO)/stdlib --tokenizer $(DEMO)/tokenizer \
		--seq-len 512 --val-fraction 0.02 --long-min-tokens 2048 --num-workers 2

demo: demo-data
	$(FOUNDRY) pretrain yamls/pretrain/tiny-cpu.yaml

# After `make demo`: ICL tasks from the stdlib (which function does this docstring describe?), scored on the
# demo model, and a picture of its run.
demo-eval: install
	@test -d $(DEMO)/icl || $(FOUNDRY) data-prep icl-stdlib $(STDLIB) --exclude 'site-packages/*' \
		--data $(DEMO)/stdlib --out $(DEMO)/icl
	$(FOUNDRY) eval runs/tiny-cpu --tasks yamls/eval/stdlib-demo.yaml --out runs/tiny-cpu/eval_results.json
	$(FOUNDRY) report runs/tiny-cpu --out runs/tiny-cpu/report.png

test: install
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check foundry tests benchmarks
	$(VENV)/bin/ruff format --check foundry tests benchmarks

format: install
	$(VENV)/bin/ruff check --fix foundry tests benchmarks
	$(VENV)/bin/ruff format foundry tests benchmarks

bench: install
	$(PY) benchmarks/throughput.py --model tiny --seq-len 256 --micro-batch 8 --steps 5

clean:
	rm -rf runs/ $(DEMO)
