# qswap: one place that knows how to install and run things on a CPU-only machine.
#   make demo   - install everything, then run the demo on the bundled model
#   make test   - install everything, then run the test suite
# The install never lets pip pick a torch: torch==2.13.0 (the local CPU build) goes in first,
# fairseq is built against it without build isolation, and fairseq's torchaudio requirement is
# left out (the PyPI torchaudio is a CUDA build that does not import next to the CPU torch).
# Every install is constrained to the exact versions CI tested (constraints.txt).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --disable-pip-version-check -q -c constraints.txt
FAIRSEQ_DEPS := cffi hydra-core==1.3.2 omegaconf==2.3.0 regex "sacrebleu>=1.4.12" tqdm bitarray scikit-learn packaging editdistance

.PHONY: install demo test bench clean

install: $(VENV)/.installed

$(VENV)/.installed: setup.py setup.cfg constraints.txt Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip setuptools wheel
	$(PIP) torch==2.13.0 "numpy>=1.21.3" cython
	$(PIP) $(FAIRSEQ_DEPS)
	$(PY) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' \
	  && $(PIP) --no-build-isolation --no-deps fairseq-fixed==0.12.3.1 \
	  || $(PIP) --no-build-isolation --no-deps fairseq==0.12.2
	$(PIP) pyyaml sentencepiece jiwer rich kaldi-native-fbank soundfile onnx onnxruntime safetensors pytest hypothesis scipy matplotlib
	$(PIP) --no-build-isolation --no-deps -e . --config-settings editable_mode=compat
	touch $@

demo: install
	$(PY) -m qswap.demo

test: install
	$(PY) -m pytest -q tests

bench: install
	$(PY) tools/bench.py

clean:
	rm -rf $(VENV) build *.egg-info
