import torch

from qswap.quant.fake_quantize import FakeQuantize
from qswap.quant.spec import QuantSpec


def test_loading_a_checkpoint_keeps_lazy_state_on_the_modules_device():
    """fairseq-train moves the model to the GPU before it loads the checkpoint it fine-tunes from:
    the per-channel grid and observer ranges loaded from a CPU state_dict must land on the
    module's device, not the checkpoint's (a CPU zero point beside CUDA activations fails)."""
    spec = QuantSpec(bits=4, granularity="per_channel", axis=0)
    trained = FakeQuantize(spec, kind="weight")
    trained(torch.randn(6, 5))
    state = trained.state_dict()
    assert state["zero_point"].shape == (6,) and state["zero_point"].device.type == "cpu"
    fresh = FakeQuantize(spec, kind="weight").to("meta")  # stands for the GPU: any non-CPU device
    fresh.load_state_dict(state)
    for name in ("scale", "zero_point", "observer.min_val", "observer.max_val"):
        t = fresh.get_buffer(name) if name != "scale" else fresh.scale
        assert t.device.type == "meta" and t.shape == state[name].shape, name


def test_a_grid_set_from_observations_keeps_the_modules_device():
    """_set_qparams resizes the grid to the observed shape on the buffers' device (a GPU
    module's first per-channel observation), whatever device the computed grid came from."""
    fq = FakeQuantize(QuantSpec(bits=4, granularity="per_channel", axis=0), kind="weight").to("meta")
    fq._set_qparams(torch.ones(6), torch.zeros(6, dtype=torch.int32))
    assert fq.scale.device.type == "meta" and fq.zero_point.device.type == "meta"
    assert fq.scale.shape == (6,) and fq.zero_point.shape == (6,)
