# qswap: one place that knows how to install and run things on a CPU-only machine.
#   make demo   - install everything, then run the demo on the bundled model
#   make test   - install everything, then run the test suite
#   make docs   - regenerate every generated page of docs/ (and the README rows they feed) from
#                 the shipped model, in the order the pages depend on each other (hours on 2 cores)
# The install never lets pip pick a torch: torch==2.13.0 (the local CPU build) goes in first,
# fairseq is built against it without build isolation, and fairseq's torchaudio requirement is
# left out (the PyPI torchaudio is a CUDA build that does not import next to the CPU torch).
# Every install is constrained to the exact versions CI tested (constraints.txt).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --disable-pip-version-check -q -c constraints.txt
FAIRSEQ_DEPS := cffi hydra-core==1.3.2 omegaconf==2.3.0 regex "sacrebleu>=1.4.12" tqdm bitarray scikit-learn packaging editdistance

.PHONY: install demo test bench docs clean

install: $(VENV)/.installed

$(VENV)/.installed: setup.py setup.cfg constraints.txt Makefile qswap/quant/_fused.c
	$(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip setuptools wheel
	$(PIP) torch==2.13.0 "numpy>=1.21.3" cython
	$(PIP) $(FAIRSEQ_DEPS)
# fairseq by the Python version, not as a fallback: a failed fairseq-fixed build had gone on to
# fairseq 0.12.2 (which does not import on 3.11) and marked the install done
	if $(PY) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)'; then \
	  $(PIP) --no-build-isolation --no-deps fairseq-fixed==0.12.3.1; \
	else \
	  $(PIP) --no-build-isolation --no-deps fairseq==0.12.2; \
	fi
	$(PY) -c 'import fairseq'
	$(PIP) pyyaml sentencepiece jiwer rich kaldi-native-fbank soundfile onnx onnxruntime safetensors pytest hypothesis scipy matplotlib
	$(PIP) --no-build-isolation --no-deps -e . --config-settings editable_mode=compat
	touch $@

demo: install
	$(PY) -m qswap.demo

test: install
	$(PY) -m pytest -q tests

bench: install
	$(PY) tools/bench.py

# Order: the sensitivity page writes the searched recipe that the demo, the accuracy, integer,
# strategy and deploy pages evaluate; the QAT page's evals compare against PTQ of the QAT run's own
# recipe (the checkpoint `qswap convert` writes, which the run starts from).
# Not repeated here: the QAT training run (tools/qat_train.py train, hours; its evals against PTQ
# are, then `tools/qat_train.py doc --save-dir RUN --evals docs/qat ...` rewrites docs/qat.md from the
# run's folder (`refresh`, below, only its PTQ and float comparisons from the evals), with the command written on the page) and docs/reliability.md (tools/reliability_table.py reads the bad-input corpus, tests/reliability/rel_cases.py).
# the QAT pages' test sets: the shipped ones, and the large ones qswap.demo materializes
QAT_SETS := test test_heldout test_large test_heldout_large
set_dir = case $(1) in *_large) $(PY) -c "import qswap.demo as m; print(m.data_dir('$(1)'))";; \
	*) echo qswap/assets/s2t_demo;; esac
# a QAT page's evals on $(QAT_SETS): PTQ checkpoint $(1), QAT checkpoint $(2) against it, into folder $(3)
qat_evals = for s in $(QAT_SETS); do d=$$($(call set_dir,$$s)) && \
	  $(VENV)/bin/qswap eval $(1) --data $$d --subset $$s --json $(3)/ptq_$$s.json && \
	  cp docs/qat/float_$$s.json $(3)/float_$$s.json && \
	  $(VENV)/bin/qswap eval $(2) --data $$d --subset $$s \
	    --baseline $(3)/ptq_$$s.json --json $(3)/qat_$$s.json || exit 1; done

docs: install
	$(PY) tools/sensitivity_doc.py
	$(PY) -m qswap.demo --markdown docs/demo.md
	$(PY) tools/accuracy_doc.py
	$(PY) tools/integer_doc.py
	$(PY) tools/integer_doc.py --layers w4a4_edges8_stream_smoothquant --layers-json docs/stream_integer_layers.json
	$(PY) tools/integer_doc.py --stream
	$(PY) tools/integer_agreement.py --simulate float --decode --subsets test test_heldout
	$(PY) tools/integer_agreement.py --shipped 10
	$(PY) tools/integer_agreement.py
	$(PY) tools/integer_archs.py
	$(PY) tools/strategies.py --qat w4a4_edges8=qswap/assets/s2t_demo/qat_w4a4_edges8_embed.pt \
	  --qat w4a8=qswap/assets/s2t_demo/qat_w4a8.pt
	mkdir -p build
	$(VENV)/bin/qswap convert qswap/assets/s2t_demo/checkpoint.pt --recipe w4a4_edges8_stream_smoothquant_lsq \
	  --data qswap/assets/s2t_demo --calib-subset train_calib --calib-batches 4 -o build/qat_ptq.pt
	for s in $(QAT_SETS); do d=$$($(call set_dir,$$s)) && \
	  $(VENV)/bin/qswap eval build/qat_ptq.pt --data $$d --subset $$s \
	    --json docs/qat/ptq_$$s.json && \
	  $(VENV)/bin/qswap eval qswap/assets/s2t_demo/checkpoint.pt --recipe fp32 --data $$d \
	    --subset $$s --json docs/qat/float_$$s.json && \
	  $(VENV)/bin/qswap eval qswap/assets/s2t_demo/qat_w4a4_edges8.pt --data $$d --subset $$s \
	    --baseline docs/qat/ptq_$$s.json --json docs/qat/qat_$$s.json || exit 1; done
	$(PY) tools/qat_train.py refresh --page docs/qat.md --evals docs/qat
	for s in $(QAT_SETS); do d=$$($(call set_dir,$$s)) && \
	  $(VENV)/bin/qswap eval qswap/assets/s2t_demo/checkpoint.pt --recipe w4a8_lsq --data $$d --subset $$s \
	    --calib-subset train_calib --calib-batches 4 --json docs/qat_w4a8/ptq_$$s.json && \
	  cp docs/qat/float_$$s.json docs/qat_w4a8/float_$$s.json && \
	  $(VENV)/bin/qswap eval qswap/assets/s2t_demo/qat_w4a8.pt --data $$d --subset $$s \
	    --baseline docs/qat_w4a8/ptq_$$s.json --json docs/qat_w4a8/qat_$$s.json || exit 1; done
	$(PY) tools/qat_train.py refresh --page docs/qat_w4a8.md --evals docs/qat_w4a8
	$(VENV)/bin/qswap convert qswap/assets/s2t_demo/checkpoint.pt --recipe w4a4_edges8_stream_embed_smoothquant_lsq \
	  --data qswap/assets/s2t_demo --calib-subset train_calib --calib-batches 4 -o build/qat_embed_ptq.pt
	$(call qat_evals,build/qat_embed_ptq.pt,qswap/assets/s2t_demo/qat_w4a4_edges8_embed.pt,docs/qat_w4a4_edges8_embed)
	$(PY) tools/qat_train.py refresh --page docs/qat_w4a4_edges8_embed.md --evals docs/qat_w4a4_edges8_embed
	$(VENV)/bin/qswap convert qswap/assets/s2t_demo/checkpoint.pt --recipe w4a4_edgew8_stream_embed_smoothquant_lsq \
	  --data qswap/assets/s2t_demo --calib-subset train_calib --calib-batches 4 -o build/qat_edgew8_ptq.pt
	$(call qat_evals,build/qat_edgew8_ptq.pt,qswap/assets/s2t_demo/qat_w4a4_edgew8_embed.pt,docs/qat_w4a4_edgew8_embed)
	$(PY) tools/qat_train.py refresh --page docs/qat_w4a4_edgew8_embed.md --evals docs/qat_w4a4_edgew8_embed
	PYTHONPATH=$(CURDIR) $(PY) tools/deploy_doc.py --threads 2 --repeats 5
	PYTHONPATH=$(CURDIR) $(PY) tools/deploy_doc.py --architectures --threads 1
	PYTHONPATH=$(CURDIR) $(PY) tools/deploy_doc.py --wer-large --threads 2
	PYTHONPATH=$(CURDIR) $(PY) tools/deploy_doc.py --low-bit --threads 2
	$(PY) tools/fairseq_walkthrough.py
	$(PY) tools/bench_audit.py --write-docs
	$(PY) tools/bench.py

clean:
	rm -rf $(VENV) build *.egg-info
