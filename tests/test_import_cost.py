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


def test_an_audit_does_not_import_torch_dynamo():
    """torch wraps a dispatch mode's handler in ``torch._dynamo.disable`` unless the mode opts out;
    the tracker does, so a one-audit process (``qswap audit``) skips the seconds-long import."""
    code = ("import sys, torch, qswap; from torch import nn; "
            "q = qswap.convert(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)), 'w8a8'); "
            "x = torch.randn(4, 8); qswap.calibrate(q, [(x,)]); r = qswap.audit(q, (x,)); "
            "assert r.honest; assert 'torch._dynamo' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
