import subprocess
import sys


def test_import_qswap_does_not_import_fairseq_or_torchaudio_or_init_cuda():
    code = ("import sys, qswap, torch; "
            "bad = [m for m in ('fairseq', 'torchaudio') if m in sys.modules]; "
            "assert not bad, bad; assert not torch.cuda.is_initialized()")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_broken_torchaudio_does_not_break_qswap(tmp_path):
    fake = tmp_path / "torchaudio"
    fake.mkdir()
    (fake / "__init__.py").write_text("raise OSError('libtorchaudio.so: undefined symbol (CUDA build)')\n")
    code = ("import qswap, qswap.models; m = qswap.models.build_s2t_transformer(); "
            "q = qswap.convert(m, 'w8a8'); q(**qswap.models.s2t_net_input())")
    env_path = f"{tmp_path}"
    subprocess.run([sys.executable, "-c", code], check=True, env={"PYTHONPATH": env_path, "PATH": ""})
