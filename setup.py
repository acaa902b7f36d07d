import sys

from setuptools import find_packages, setup

# fairseq 0.12.2 does not import on Python >= 3.11; fairseq-fixed ships the same `fairseq` package.
FAIRSEQ = "fairseq-fixed==0.12.3.1" if sys.version_info >= (3, 11) else "fairseq==0.12.2"

setup(
    # the shipped recipes live in the top-level recipes/ folder and install as qswap.recipes
    packages=find_packages(include=["qswap", "qswap.*", "qswap_fairseq_plugin"]) + ["qswap.recipes"],
    package_dir={"qswap.recipes": "recipes"},
    package_data={"qswap.recipes": ["*.yaml"],
                  "qswap": ["assets/*", "assets/*/*", "fairseq_plugin/qswap_fairseq_plugin/*.py"]},
    install_requires=[
        "torch>=2.0",
        FAIRSEQ,
        "sentencepiece",
        "jiwer",
        "pyyaml",
        "regex",  # recipe path regexes run with a timeout (also a fairseq dependency)
        "rich",
        "kaldi-native-fbank",
    ],
    extras_require={"test": ["pytest", "hypothesis==6.170.17"]},  # property tests of integer ops
)
