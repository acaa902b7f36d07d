from setuptools import find_packages, setup

# Metadata and dependencies are in setup.cfg; this file only lays out the packages.
setup(
    # the shipped recipes live in the top-level recipes/ folder and install as qswap.recipes
    packages=find_packages(include=["qswap", "qswap.*", "qswap_fairseq_plugin"]) + ["qswap.recipes"],
    package_dir={"qswap.recipes": "recipes"},
    package_data={"qswap.recipes": ["*.yaml"],
                  "qswap": ["assets/*", "assets/*/*", "assets/*/*/*", "fairseq_plugin/qswap_fairseq_plugin/*.py"]},
)
