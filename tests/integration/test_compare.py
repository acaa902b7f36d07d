"""qswap.integration.compare's library functions on the shipped model."""
import qswap
from qswap.convert import copy_model
from qswap.integration import data as fdata
from qswap.integration.compare import prepare_recipe, score

ASSET = f"{qswap.__path__[0]}/assets/s2t_demo"


def shipped():
    return fdata.load_model_and_task(f"{ASSET}/checkpoint.pt", ASSET)


def test_macs_per_second_do_not_depend_on_the_batching():
    """MMACs/s and GBOPs/s had been one forward of the first batch, its padded frames counted, over
    its unpadded seconds: 86.8 MMACs/s at --max-sentences 1, 104.0 at 8 for one float model."""
    model, task = shipped()
    fp32 = prepare_recipe(copy_model(model), task, "fp32", calib_subset="train_calib", calib_batches=1)
    rates = {ms: score(fp32, task, "fp32", subset="test", beam=1, max_sentences=ms, batches=1) for ms in (1, 8)}
    assert rates[1].mmacs_per_s == rates[8].mmacs_per_s
    assert rates[1].gbops_per_s == rates[8].gbops_per_s
