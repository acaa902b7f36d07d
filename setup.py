from setuptools import Extension, find_packages, setup

# Metadata and dependencies are in setup.cfg; this file lays out the packages and the C kernel.
setup(
    # the shipped recipes live in the top-level recipes/ folder and install as qswap.recipes
    packages=find_packages(include=["qswap", "qswap.*", "qswap_fairseq_plugin"]) + ["qswap.recipes"],
    package_dir={"qswap.recipes": "recipes"},
    # the one-pass fake-quantization kernel (qswap/quant/_fused.c); optional: without a C compiler
    # the install goes on and qswap runs torch's four passes instead (qswap.quant.fused)
    ext_modules=[Extension("qswap.quant._fused", ["qswap/quant/_fused.c"], optional=True,
                           extra_compile_args=["-O3", "-ffp-contract=off", "-fno-math-errno"])],
    package_data={"qswap.recipes": ["*.yaml"],
                  "qswap": ["assets/*", "assets/*/*", "assets/*/*/*", "fairseq_plugin/qswap_fairseq_plugin/*.py"]},
)
