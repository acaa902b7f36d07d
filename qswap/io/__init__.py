"""Reading and writing files safely: atomic writes, safe checkpoint loading, qswap checkpoints.

``import qswap.io`` imports neither fairseq nor omegaconf; the checkpoint functions import them
when called.
"""
from qswap.io.atomic import atomic_open, atomic_write_bytes, atomic_write_text
from qswap.io.checkpoint import load_fairseq_model, save_qswap_checkpoint
from qswap.io.safe_load import TRUST_FLAG, allowed_globals, load_checkpoint

__all__ = ["TRUST_FLAG", "allowed_globals", "atomic_open", "atomic_write_bytes", "atomic_write_text",
           "load_checkpoint", "load_fairseq_model", "save_qswap_checkpoint"]
