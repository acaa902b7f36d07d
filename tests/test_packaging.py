"""The package as pip sees it: a wheel builds from the source tree, declares its runtime
dependencies with lower bounds only, and installs into a fresh venv that already holds torch and
fairseq without replacing them; the installed qswap imports and loads a shipped recipe.

No network: pip runs with ``--no-index`` and without the machine's pip configuration. The fresh
venv sees this interpreter's packages (torch, fairseq, ...) through a ``.pth`` file naming a folder
of links to them, qswap's own installation left out.
"""
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("setup.py", "setup.cfg", "README.md", "recipes", "qswap")


def _pip_env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_") and k != "PYTHONPATH"}
    return {**env, "PIP_CONFIG_FILE": os.devnull, "PIP_NO_INDEX": "1",
            "PIP_DISABLE_PIP_VERSION_CHECK": "1"}


def _run(*cmd, cwd: Path) -> str:
    done = subprocess.run([str(c) for c in cmd], cwd=cwd, env=_pip_env(), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, f"{cmd}\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """qswap's wheel, built from a copy of the source tree (the checkout gets no build/ folder)."""
    pytest.importorskip("setuptools")
    pytest.importorskip("wheel")
    tmp = tmp_path_factory.mktemp("packaging")
    src = tmp / "src"
    for name in SOURCES:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            src.mkdir(exist_ok=True)
            shutil.copy2(path, src / name)
    _run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", tmp / "dist", src, cwd=tmp)
    (built,) = (tmp / "dist").glob("qswap-*.whl")
    return built


def _requires(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as zf:
        (name,) = [n for n in zf.namelist() if n.endswith(".dist-info/METADATA")]
        meta = zf.read(name).decode()
    return [line.split(": ", 1)[1] for line in meta.splitlines() if line.startswith("Requires-Dist: ")]


def test_wheel_declares_runtime_dependencies_as_lower_bounds(wheel):
    requires = [r for r in _requires(wheel) if "extra ==" not in r]
    names = {r.split(">=")[0].split(";")[0].strip() for r in requires}
    assert names >= {"torch", "fairseq-fixed", "fairseq", "jiwer", "kaldi-native-fbank", "sentencepiece",
                     "pyyaml", "regex", "rich", "numpy", "omegaconf"}, requires
    assert all(">=" in r and "==" not in r for r in requires), requires  # exact pins: constraints.txt
    fairseq = {r.split(">=")[0]: r for r in requires if r.startswith("fairseq")}
    assert 'python_version >= "3.11"' in fairseq["fairseq-fixed"]  # a marker, not the build's Python
    assert 'python_version < "3.11"' in fairseq["fairseq"]


def test_constraints_pin_every_runtime_dependency(wheel):
    """constraints.txt (what the Makefile installs with) pins each declared dependency exactly,
    and each pin satisfies the declared lower bound."""
    from packaging.requirements import Requirement

    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            req = Requirement(line)
            pins[req.name.lower().replace("_", "-")] = req
    for text in _requires(wheel):
        req = Requirement(text)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue  # another Python's fairseq, or an extra
        pin = pins[req.name.lower()]
        (spec,) = pin.specifier
        assert spec.operator == "==", pin
        assert req.specifier.contains(spec.version, prereleases=True), (req, pin)


def _venv_with_this_interpreters_packages(tmp: Path) -> Path:
    """A fresh venv (no pip) whose sys.path reaches this interpreter's site-packages, qswap left out."""
    site = Path(sysconfig.get_paths()["purelib"])
    deps = tmp / "deps"
    deps.mkdir()
    for entry in site.iterdir():
        if not entry.name.lower().startswith(("qswap", "__editable__", "__pycache__")) and entry.suffix != ".pth":
            (deps / entry.name).symlink_to(entry)
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    venv_site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip()
    (Path(venv_site) / "_existing_packages.pth").write_text(f"{deps}\n")
    return python


PROBE = """
import importlib.metadata as md, json, sys
import qswap
recipe = qswap.load_recipe("w8a8")
dists = {name: (md.version(name), str(md.distribution(name).locate_file("")))
         for name in ("torch", "fairseq-fixed", "qswap")}
print(json.dumps({"qswap": qswap.__file__, "recipe": recipe.name, "dists": dists,
                  "fairseq_imported": "fairseq" in sys.modules}))
"""


@pytest.mark.skipif(sys.version_info < (3, 11), reason="the venv's fairseq is fairseq-fixed (Python >= 3.11)")
def test_wheel_installs_next_to_existing_torch_and_fairseq(wheel, tmp_path):
    from importlib.metadata import version

    python = _venv_with_this_interpreters_packages(tmp_path)
    _run(sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-build-isolation",
         "-q", wheel, cwd=tmp_path)
    probe = json.loads(_run(python, "-c", PROBE, cwd=tmp_path))
    venv = python.parent.parent
    assert Path(probe["qswap"]).is_relative_to(venv)  # the installed wheel, not the checkout
    assert probe["recipe"] == "w8a8" and not probe["fairseq_imported"]
    for name in ("torch", "fairseq-fixed"):  # still this interpreter's, same versions
        found, where = probe["dists"][name]
        assert found == version(name) and Path(where).is_relative_to(tmp_path / "deps"), (name, found, where)
    # pip's own check: every requirement of the installed qswap is met; the one unmet requirement
    # is fairseq's torchaudio, which the Makefile leaves out on purpose (a CUDA build on PyPI)
    check = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "check"], env=_pip_env(),
                           capture_output=True, text=True, timeout=120, cwd=tmp_path)
    problems = [line for line in check.stdout.splitlines() if line.strip()]
    assert not [p for p in problems if p.startswith("qswap")], problems
    assert all("torchaudio" in p for p in problems), problems
    assert "w8a8" in _run(venv / "bin" / "qswap", "recipes", cwd=tmp_path)  # the console script
