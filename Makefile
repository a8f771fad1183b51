# The README's first two commands: `make demo` and `make test`. Both create .venv/ first if needed.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
FOUNDRY := $(VENV)/bin/foundry
# The Python standard library's own .py files: real code, present on every machine, written by no one here.
STDLIB := $(shell python3 -c "import sysconfig; print(sysconfig.get_paths()['stdlib'])")
DEMO := data/demo

.PHONY: install demo demo-data demo-tokenizer demo-sft-data demo-sft test lint format bench clean

install: $(VENV)/.installed

# torch is left to pip (the registry's CUDA build, which runs on CPUs): mosaicml-streaming imports
# torchvision, whose extension needs that build. Do not pin a CPU-only torch wheel here.
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

demo-tokenizer: install
	@test -f $(DEMO)/tokenizer/tokenizer.json || $(FOUNDRY) data-prep tokenizer $(STDLIB) --glob '*.py' \
		--exclude 'site-packages/*' --out $(DEMO)/tokenizer --vocab-size 4096

demo-data: demo-tokenizer
	$(FOUNDRY) data-prep text $(STDLIB) --glob '*.py' --exclude 'site-packages/*' --out $(DEMO)/stdlib --tokenizer $(DEMO)/tokenizer \
		--seq-len 512 --val-fraction 0.02 --long-min-tokens 2048 --num-workers 2

demo: demo-data
	$(FOUNDRY) pretrain yamls/pretrain/tiny-cpu.yaml

# Chat data for finetuning, made offline from the stdlib's docstrings, in ChatML with the demo tokenizer.
demo-sft-data: demo-tokenizer
	$(PY) -m foundry.data_prep.demo_chat --stdlib $(STDLIB) --out $(DEMO)/docstrings.jsonl --conversations 3000
	$(FOUNDRY) data-prep sft $(DEMO)/docstrings.jsonl:val_split=0.05,max_val_set=100 --out $(DEMO)/sft \
		--tokenizer $(DEMO)/tokenizer --seq-len 512 --num-workers 2

# Finetune the demo's pretrained model (runs/tiny-cpu, from `make demo`, made first if missing) on the
# docstring chats, then ask it a question.
demo-sft: demo-sft-data
	@test -d runs/tiny-cpu/checkpoints || $(MAKE) demo
	$(FOUNDRY) finetune yamls/finetune/tiny-sft-cpu.yaml load_path=runs/tiny-cpu data.streams.sft.local=$(DEMO)/sft
	$(FOUNDRY) generate runs/tiny-sft-cpu --chat --prompt 'What does `json.dumps` do?' --max-new-tokens 60

test: install
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check foundry tests benchmarks
	$(VENV)/bin/ruff format --check foundry tests benchmarks
	$(VENV)/bin/lint-imports

format: install
	$(VENV)/bin/ruff check --fix foundry tests benchmarks
	$(VENV)/bin/ruff format foundry tests benchmarks

bench: install
	$(PY) benchmarks/throughput.py --model tiny --seq-len 256 --micro-batch 8 --steps 5

clean:
	rm -rf runs/ $(DEMO)
