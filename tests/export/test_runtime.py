"""fairseq's SequenceGenerator driving the exported graphs in onnxruntime (qswap.export.runtime):
the float export gives fairseq's transcripts, padded batches decode as their utterances alone,
bad export directories give typed errors, and the beam search shapes the shipped decode does
not use (beam 1, one utterance, forced prefix tokens) give fairseq's own hypotheses."""
import copy
import itertools
import json
import shutil
from pathlib import Path

import pytest
import torch

import qswap
from qswap.errors import ExportError

pytest.importorskip("fairseq")
pytest.importorskip("onnxruntime")

from qswap.export.package import MANIFEST, NO_QUANT, export_model, manifest_digest, read_manifest  # noqa: E402
from qswap.export.runtime import load_deployed, load_exported, sentence_rows  # noqa: E402
from qswap.integration import data as fdata  # noqa: E402
from qswap.integration.decode import decode  # noqa: E402
from fairseq.sequence_generator import SequenceGenerator  # noqa: E402

ASSET = Path(qswap.__file__).parent / "assets" / "s2t_demo"


@pytest.fixture(scope="module")
def shipped_float(tmp_path_factory):
    """The shipped model, its task, and its float export (qswap's modules, no quantizers)."""
    torch.set_num_threads(1)
    model, cfg, task = fdata.load_model_cfg_task(ASSET / "checkpoint.pt", ASSET)
    out = tmp_path_factory.mktemp("float")
    export_model(qswap.convert(model, NO_QUANT), out, task_cfg=cfg.task, audit=False, allow_float=True)
    return model, task, out


def test_float_export_beam_search_gives_fairseqs_transcripts(shipped_float):
    model, task, out = shipped_float
    samples = list(itertools.islice(fdata.batches(task, "test", max_sentences=8), 3))  # padded batches
    ours = decode(task, load_exported(out, task.target_dictionary), samples, beam=5)
    fairseq = decode(task, model, samples, beam=5)
    assert [u.hyp for u in ours.utterances] == [u.hyp for u in fairseq.utterances]
    assert len(ours.utterances) == 24 and all(u.hyp for u in ours.utterances)


def test_a_padded_batch_decodes_as_its_utterances_alone(shipped_float):
    _, task, out = shipped_float
    ort = load_exported(out, task.target_dictionary)
    batch = next(iter(fdata.batches(task, "test", max_sentences=4)))
    lengths = batch["net_input"]["src_lengths"]
    assert lengths.min() < lengths.max()  # the shorter utterances are padded
    together = {u.id: u.hyp for u in decode(task, ort, [batch], beam=3).utterances}
    for i in range(4):
        n = int(lengths[i])
        alone = {"id": batch["id"][i:i + 1], "target": batch["target"][i:i + 1],
                 "net_input": {"src_tokens": batch["net_input"]["src_tokens"][i:i + 1, :n],
                               "src_lengths": lengths[i:i + 1]}}
        assert decode(task, ort, [alone], beam=3).utterances[0].hyp == together[int(batch["id"][i])]


def test_encoder_output_keeps_one_row_per_sentence(shipped_float):
    """SequenceGenerator reorders every step within each sentence's beams: like fairseq's own
    static encoder-decoder keys and values, the exported encoder's output is then kept as it is.
    It stays one row per sentence through the beams' expansion, and follows the sentences a
    batch that drops finished ones keeps."""
    _, task, out = shipped_float
    ort = load_exported(out, task.target_dictionary)
    net = next(iter(fdata.batches(task, "test", max_sentences=2)))["net_input"]
    beams = 3
    enc = ort.encoder(**net)
    expanded = ort.encoder.reorder_encoder_out(enc, torch.arange(2).repeat_interleave(beams))
    assert all(a is b for a, b in zip(expanded["cross_kv"], enc["cross_kv"]))  # (2, H, S, D)
    assert expanded["encoder_out"][0] is enc["encoder_out"][0] and int(expanded["hypotheses"][0]) == 2 * beams
    within = torch.tensor([2, 0, 0, 3, 5, 4])  # each row takes a row of its own sentence's beams
    assert ort.encoder.reorder_encoder_out(expanded, within) is expanded
    dropped = ort.encoder.reorder_encoder_out(expanded, torch.tensor([3, 5, 5]))  # sentence 0 finished
    assert all(torch.equal(a, b[1:]) for a, b in zip(dropped["cross_kv"], enc["cross_kv"]))
    assert torch.equal(dropped["encoder_padding_mask"][0], enc["encoder_padding_mask"][0][1:])
    assert torch.equal(dropped["encoder_out"][0], enc["encoder_out"][0][:, 1:])
    assert int(dropped["hypotheses"][0]) == 3
    swapped = ort.encoder.reorder_encoder_out(expanded, torch.tensor([3, 4, 5, 0, 1, 2]))  # across sentences
    assert all(torch.equal(a, b.flip(0)) for a, b in zip(swapped["cross_kv"], enc["cross_kv"]))
    assert torch.equal(swapped["encoder_padding_mask"][0], enc["encoder_padding_mask"][0].flip(0))
    mixed = ort.encoder.reorder_encoder_out(expanded, torch.tensor([0, 3, 1, 4, 2, 5]))  # one per row
    assert torch.equal(mixed["encoder_out"][0], enc["encoder_out"][0][:, [0, 1, 0, 1, 0, 1]])


@pytest.mark.parametrize("order, beam, rows", [
    ([0, 0, 0, 1, 1, 1], 1, [0, 1]),  # the beams made: one row per sentence
    ([3, 5, 4, 6, 8, 8], 3, [1, 2]),  # sentence 0 dropped, beams reordered within the others
    ([0, 1, 2, 3], 2, [0, 1]),  # beams of 2 kept
    ([0, 0, 3, 5, 5], 2, [0, 0, 1, 2, 2]),  # runs of unequal length: a row per hypothesis
])
def test_sentence_rows(order, beam, rows):
    assert sentence_rows(torch.tensor(order), beam).tolist() == rows


def test_load_deployed_sets_up_the_task_from_the_manifest(shipped_float):
    _, task, out = shipped_float
    ort, task2 = load_deployed(out, ASSET)
    assert len(task2.target_dictionary) == len(task.target_dictionary) and ort.recipe == "no_quant"


def test_load_deployed_says_a_data_file_is_no_data_directory(shipped_float):
    """--data config.yaml for an ONNX export had been told 'data directory ... does not exist'."""
    from qswap.errors import DataError

    _, _, out = shipped_float
    with pytest.raises(DataError, match=r"config\.yaml is a file, not a data directory"):
        load_deployed(out, ASSET / "config.yaml")


def test_teacher_forced_forward_is_a_typed_error(shipped_float):
    _, task, out = shipped_float
    ort = load_exported(out, task.target_dictionary)
    with pytest.raises(ExportError, match="incremental step"):
        ort.decoder(torch.full((1, 3), 2))


@pytest.mark.parametrize("damage", ["no_manifest", "no_graph", "truncated", "bad_format"])
def test_damaged_export_directory_is_a_typed_error(shipped_float, tmp_path, damage):
    _, task, out = shipped_float
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    if damage == "no_manifest":
        (copy / MANIFEST).unlink()
    elif damage == "no_graph":
        (copy / "cross_kv.onnx").unlink()
    elif damage == "truncated":
        data = (copy / "decoder_step.onnx").read_bytes()
        (copy / "decoder_step.onnx").write_bytes(data[: len(data) // 3])
    else:
        manifest = json.loads((copy / MANIFEST).read_text())
        (copy / MANIFEST).write_text(json.dumps({**manifest, "format": 99}))
    with pytest.raises(ExportError):
        load_exported(copy, task.target_dictionary)


@pytest.mark.parametrize("field, value", [("graphs", ["encoder.onnx"]), ("decoder_layers", "3"), ("task", ["x"]),
                                          ("max_target_positions", None), ("max_target_positions", 0),
                                          ("dictionary", "d"), ("claims_honest", "yes"), ("recipe", 3)])
def test_a_manifest_field_of_the_wrong_type_is_a_typed_error(shipped_float, tmp_path, field, value):
    _, task, out = shipped_float
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    manifest = json.loads((copy / MANIFEST).read_text())
    (copy / MANIFEST).write_text(json.dumps({**manifest, field: value}))
    with pytest.raises(ExportError, match=f"malformed manifest \\({field}|malformed manifest \\(a seq2seq"):
        load_exported(copy, task.target_dictionary)


def resealed(manifest: dict) -> dict:
    """``manifest`` with its ``manifest_sha256`` recomputed: an edit made past the manifest's own
    digest, for the checks behind it (the graphs' digests, what each graph takes)."""
    return {**manifest, "manifest_sha256": manifest_digest(manifest)}


@pytest.mark.parametrize("field, value", [("recipe", "w8a8"), ("claims_honest", True), ("claims_honest", False),
                                          ("task", {"data": "/elsewhere"}), ("manifest_sha256", "0" * 64)])
def test_an_edited_manifest_field_is_refused(shipped_float, tmp_path, field, value):
    """Format 3 covered only the graphs by digests: a recipe renamed or the fake-quant audit's verdict
    changed by hand had relabelled the deployed model's results and its deploy audit."""
    _, task, out = shipped_float
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    manifest = json.loads((copy / MANIFEST).read_text())
    assert manifest[field] != value
    (copy / MANIFEST).write_text(json.dumps({**manifest, field: value}))
    with pytest.raises(ExportError, match="edited after export .*manifest_sha256"):
        read_manifest(copy)
    with pytest.raises(ExportError, match="edited after export"):
        load_exported(copy, task.target_dictionary)


def test_a_seq2seq_manifest_without_its_dictionary_is_refused(shipped_float, tmp_path):
    """Every seq2seq export records its decoder's dictionary: an empty one (sealed, as a format 3
    export written before the facts were recorded would read) had left the data directory's
    dictionary unchecked."""
    _, task, out = shipped_float
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    manifest = json.loads((copy / MANIFEST).read_text())
    assert manifest["dictionary"]["size"] == len(task.target_dictionary)
    (copy / MANIFEST).write_text(json.dumps(resealed({**manifest, "dictionary": {}})))
    with pytest.raises(ExportError, match="a seq2seq export that records no target dictionary"):
        load_exported(copy, task.target_dictionary)


@pytest.mark.parametrize("edit", ["fewer layers", "more layers", "graphs swapped"])
def test_a_manifest_that_does_not_describe_its_graphs_says_so(shipped_float, tmp_path, edit):
    """decoder_layers edited, or the encoder's and cross_kv's entries swapped: onnxruntime's
    missing-input error had told the user to 'pass inputs of the dtypes and ranks the graph
    declares', inputs they never passed."""
    _, task, out = shipped_float
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    manifest = json.loads((copy / MANIFEST).read_text())
    if edit == "graphs swapped":
        graphs, digests = manifest["graphs"], manifest["digests"]
        graphs["encoder"], graphs["cross_kv"] = graphs["cross_kv"], graphs["encoder"]
        digests["encoder"], digests["cross_kv"] = digests["cross_kv"], digests["encoder"]  # consistent
    else:
        manifest["decoder_layers"] += -1 if edit == "fewer layers" else 1
    (copy / MANIFEST).write_text(json.dumps(resealed(manifest)))
    with pytest.raises(ExportError, match="export.json does not describe its graphs: the graph it names as"):
        load_exported(copy, task.target_dictionary)


@pytest.mark.parametrize("change", [-1, 1])
def test_an_edited_position_limit_is_refused(shipped_float, tmp_path, change):
    """max_target_positions edited smaller had truncated every hypothesis silently (fairseq's
    generator stops there: WER 87.9 % against 6.1 %), larger ran past the step graph's position
    table: the step graph records its limit and the loader holds export.json to it."""
    _, task, out = shipped_float
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    manifest = json.loads((copy / MANIFEST).read_text())
    limit = manifest["max_target_positions"]
    manifest["max_target_positions"] = limit + change
    (copy / MANIFEST).write_text(json.dumps(resealed(manifest)))
    with pytest.raises(ExportError, match=f"max_target_positions {limit + change}, the decoder step graph was "
                                          f"exported with {limit} positions"):
        load_exported(copy, task.target_dictionary)
    assert load_exported(out, task.target_dictionary).max_decoder_positions() == limit


def test_a_dictionary_of_the_same_size_with_other_symbols_is_refused(shipped_float):
    """The export records the target dictionary's facts: two symbols swapped would decode other
    words at the same vocabulary size."""
    _, task, out = shipped_float
    assert read_manifest(out).dictionary["size"] == len(task.target_dictionary)
    swapped = copy.deepcopy(task.target_dictionary)
    swapped.symbols[4], swapped.symbols[5] = swapped.symbols[5], swapped.symbols[4]
    with pytest.raises(ExportError, match="not the one the model was exported with"):
        load_exported(out, swapped)
    load_exported(out, task.target_dictionary)  # its own loads


def test_one_directory_holds_one_export(shipped_float, tmp_path):
    """An ONNX export refuses a directory holding an integer model and the integer writer refuses
    an ONNX export's; a seq2seq export over a CTC one leaves no CTC graph behind."""
    from qswap.errors import OutputError
    from qswap.export.integer_format import write_integer_model

    model, task, out = shipped_float
    onnx_dir = tmp_path / "onnx"
    shutil.copytree(out, onnx_dir)
    with pytest.raises(OutputError, match="holds an ONNX export"):
        write_integer_model(qswap.integerize(_calibrated_shipped(model, task)), onnx_dir)
    assert not (onnx_dir / "model.json").exists()
    integer_dir = tmp_path / "integer"
    write_integer_model(qswap.integerize(_calibrated_shipped(model, task)), integer_dir)
    with pytest.raises(OutputError, match="holds an integer model export"):
        export_model(qswap.convert(model, NO_QUANT), integer_dir, audit=False, allow_float=True)
    assert not (integer_dir / MANIFEST).exists()
    (onnx_dir / "ctc.onnx").write_bytes(b"an older CTC export's graph")
    export_model(qswap.convert(model, NO_QUANT), onnx_dir, task_cfg=None, audit=False, allow_float=True)
    assert not (onnx_dir / "ctc.onnx").exists() and read_manifest(onnx_dir).kind == "seq2seq"


def test_an_onnx_export_into_a_folder_of_other_files_is_refused(shipped_float, tmp_path):
    """A folder whose encoder.onnx qswap did not write lost it to the export; refused, the folder
    as it was. An earlier ONNX export's folder (its export.json) takes the new export."""
    from qswap.errors import OutputError

    model, _, out = shipped_float
    for files in ({"encoder.onnx": "mine", "notes.txt": "mine"}, {MANIFEST: "[1, 2]", "encoder.onnx": "mine"}):
        folder = tmp_path / f"foreign{len(list(tmp_path.iterdir()))}"
        folder.mkdir()
        for name, text in files.items():
            (folder / name).write_text(text)
        with pytest.raises(OutputError, match="is a folder with other files, not an ONNX export"):
            export_model(qswap.convert(model, NO_QUANT), folder, audit=False, allow_float=True)
        assert {p.name: p.read_text() for p in folder.iterdir()} == files
    again = tmp_path / "again"
    shutil.copytree(out, again)
    (again / "notes.txt").write_text("mine")
    export_model(qswap.convert(model, NO_QUANT), again, audit=False, allow_float=True)
    assert read_manifest(again).kind == "seq2seq" and (again / "notes.txt").read_text() == "mine"


def test_an_interrupted_publish_leaves_no_manifest_to_load(shipped_float, tmp_path, monkeypatch):
    """Interrupted after the graphs are renamed into place, before the new export.json: the old
    manifest is gone, so the directory is refused rather than loaded as the old export."""
    import qswap.export.package as package

    model, task, out = shipped_float
    directory = tmp_path / "d"
    shutil.copytree(out, directory)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(package, "write_manifest", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export_model(qswap.convert(model, NO_QUANT), directory, audit=False, allow_float=True)
    with pytest.raises(ExportError, match="no export.json there"):
        load_exported(directory, task.target_dictionary)
    monkeypatch.undo()  # export again into it, as the error says: the stopped publish is qswap's, replaced
    export_model(qswap.convert(model, NO_QUANT), directory, audit=False, allow_float=True)
    load_exported(directory, task.target_dictionary)


def test_graphs_of_another_tool_without_a_manifest_are_not_replaced(shipped_float, tmp_path):
    """A folder of graphs named as qswap's but without qswap's site map (another tool's
    encoder.onnx) is not taken for a stopped export: refused, untouched."""
    import onnx

    from qswap.errors import OutputError
    from qswap.export.sites import METADATA_KEY

    model, _, out = shipped_float
    directory = tmp_path / "d"
    directory.mkdir()
    graph = onnx.load(str(out / "encoder.onnx"))
    kept = [p for p in graph.metadata_props if p.key != METADATA_KEY]
    del graph.metadata_props[:]
    graph.metadata_props.extend(kept)
    onnx.save(graph, str(directory / "encoder.onnx"))
    before = (directory / "encoder.onnx").read_bytes()
    with pytest.raises(OutputError, match="is a folder with other files"):
        export_model(qswap.convert(model, NO_QUANT), directory, audit=False, allow_float=True)
    assert (directory / "encoder.onnx").read_bytes() == before


def test_a_re_export_drops_the_old_exports_optimized_graphs(shipped_float, tmp_path):
    """``qswap audit DIR --onnx`` saves optimized graphs in DIR/optimized; a new export into DIR
    removes them (they describe the old one, which no digest would tell)."""
    from qswap.export.onnx_audit import audit_export

    model, task, out = shipped_float
    directory = tmp_path / "d"
    shutil.copytree(out, directory)
    audit_export(directory, save_optimized=directory / "optimized")
    assert list((directory / "optimized").glob("*.onnx"))
    export_model(qswap.convert(model, NO_QUANT), directory, audit=False, allow_float=True)
    assert not (directory / "optimized").exists()


def test_a_refused_audit_makes_no_folder(shipped_float, tmp_path):
    from qswap.export.onnx_audit import audit_export

    _, _, out = shipped_float
    directory = tmp_path / "d"
    shutil.copytree(out, directory)
    (directory / "cross_kv.onnx").write_bytes((directory / "encoder.onnx").read_bytes())  # two exports mixed
    with pytest.raises(ExportError, match="SHA-256 differs"):
        audit_export(directory, save_optimized=directory / "optimized")
    assert not (directory / "optimized").exists()


@pytest.mark.parametrize("threads", [0, -1, 2.5, True])
def test_threads_that_are_not_a_positive_whole_number_are_a_typed_error(shipped_float, threads):
    _, task, out = shipped_float
    with pytest.raises(ExportError, match="threads must be a whole number >= 1"):
        load_exported(out, task.target_dictionary, threads=threads)


def test_run_encoder_takes_tensors_that_require_grad(shipped_float):
    from qswap.export.onnx import load_session, run_encoder

    _, task, out = shipped_float
    net = next(iter(fdata.batches(task, "test", max_sentences=2)))["net_input"]
    feats = net["src_tokens"].clone().requires_grad_(True)
    encoded, _ = run_encoder(load_session(out / "encoder.onnx"), feats, net["src_lengths"])
    plain, _ = run_encoder(load_session(out / "encoder.onnx"), net["src_tokens"], net["src_lengths"])
    assert torch.equal(encoded, plain)


def _calibrated_shipped(model, task):
    batches = list(itertools.islice(fdata.net_inputs(task, "train_calib", 1), 1))
    qmodel = qswap.convert(model, "w8a8")
    qswap.calibrate(qmodel, batches)
    return qmodel


# -- beam search shapes the shipped decode does not use: beam 1 and 2, one utterance, forced prefix
def _search_setup(shipped_float):
    """The float model, its export in onnxruntime, the target dictionary, two padded test batches."""
    model, task, out = shipped_float
    batches = list(itertools.islice(fdata.batches(task, "test", max_sentences=3), 2))
    return model.eval(), load_exported(out, task.target_dictionary).eval(), task.target_dictionary, batches


def _search(model, dictionary, sample, beam, prefix_tokens=None):
    generator = SequenceGenerator([model], dictionary, beam_size=beam, max_len_a=0, max_len_b=60)
    with torch.no_grad():
        hypos = generator.generate([model], sample, prefix_tokens=prefix_tokens)
    return [[(h["tokens"].tolist(), float(h["score"])) for h in sentence] for sentence in hypos]


def _assert_same(ours, fairseqs):
    """The same hypotheses, in the same order, with scores equal up to float32 summation order."""
    assert [[tokens for tokens, _ in s] for s in ours] == [[tokens for tokens, _ in s] for s in fairseqs]
    for s_ours, s_fairseq in zip(ours, fairseqs):
        for (_, a), (_, b) in zip(s_ours, s_fairseq):
            assert a == pytest.approx(b, abs=1e-3)


def _one(sample, i):
    n = int(sample["net_input"]["src_lengths"][i])
    return {"id": sample["id"][i:i + 1],
            "net_input": {"src_tokens": sample["net_input"]["src_tokens"][i:i + 1, :n],
                          "src_lengths": sample["net_input"]["src_lengths"][i:i + 1]}}


@pytest.mark.parametrize("beam", [1, 2])
def test_small_beams_give_fairseqs_hypotheses(shipped_float, beam):
    model, ort, dictionary, batches = _search_setup(shipped_float)
    for sample in batches:
        _assert_same(_search(ort, dictionary, sample, beam), _search(model, dictionary, sample, beam))


@pytest.mark.parametrize("beam", [1, 5])
def test_a_batch_of_one_utterance_gives_fairseqs_hypotheses(shipped_float, beam):
    model, ort, dictionary, batches = _search_setup(shipped_float)
    sample = _one(batches[0], 1)
    _assert_same(_search(ort, dictionary, sample, beam), _search(model, dictionary, sample, beam))


def test_forced_prefix_tokens_give_fairseqs_hypotheses(shipped_float):
    """Prefix tokens (fairseq-generate's --prefix-size): the reference's first two tokens forced;
    the continuation is searched over the graphs."""
    model, ort, dictionary, batches = _search_setup(shipped_float)
    sample = batches[0]
    prefix = sample["target"][:, :2]
    assert (prefix != dictionary.pad()).all()
    ours = _search(ort, dictionary, sample, 3, prefix_tokens=prefix)
    _assert_same(ours, _search(model, dictionary, sample, 3, prefix_tokens=prefix))
    assert all(h[0][:2] == row.tolist() for s, row in zip(ours, prefix) for h in s)


def test_a_directory_that_mixes_two_exports_is_refused(shipped_float, tmp_path):
    """A graph that is not the one export.json describes (an export interrupted between its renames,
    a graph copied in by hand): the same graph with other bytes is refused by its SHA-256."""
    import onnx

    _, task, out = shipped_float
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    graph = onnx.load(str(copy / "encoder.onnx"))
    graph.doc_string = "another export"
    onnx.save(graph, str(copy / "encoder.onnx"))
    with pytest.raises(ExportError, match="not the encoder graph export.json describes .*mixes two exports"):
        load_exported(copy, task.target_dictionary)


def test_a_failed_export_leaves_the_directory_as_it_was(shipped_float, tmp_path, monkeypatch):
    """A graph onnxruntime does not load (here its loader refuses the last graph staged, the
    decoder step; the graphs qswap makes load, 2-bit weights included:
    tests/export/test_compact.py): the export stops with an ExportError that says so and names the
    directory; an earlier export there is left byte for byte, with no staged files, and a
    directory the export would have created is not made."""
    import qswap.export.onnx as onnx_export
    model, task, out = shipped_float
    recipe = {"version": 1, "name": "w2a8", "defaults": {"weight": {"bits": 2}, "activation": {"bits": 8}}}
    qmodel = qswap.convert(model, recipe)
    qswap.calibrate(qmodel, list(fdata.net_inputs(task, "train_calib", 1, max_sentences=4)))
    load = onnx_export.load_session

    def refusing(path, *args, **kwargs):
        if "decoder_step" in Path(path).name:
            raise ExportError("onnxruntime cannot load it") from RuntimeError("[ONNXRuntimeError] : 1 : FAIL : a node")
        return load(path, *args, **kwargs)
    monkeypatch.setattr(onnx_export, "load_session", refusing)
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    before = {p.name: p.read_bytes() for p in copy.iterdir()}
    with pytest.raises(ExportError, match="onnxruntime cannot load the graph qswap made of this model.*nothing was "
                                          "written"):
        export_model(qmodel, copy, audit=False)
    assert {p.name: p.read_bytes() for p in copy.iterdir()} == before
    fresh = tmp_path / "new" / "deploy"
    with pytest.raises(ExportError):
        export_model(qmodel, fresh, audit=False)
    assert not fresh.exists() and not (tmp_path / "new").exists()  # the parent it made too


@pytest.mark.parametrize("name", ["absolute", "../elsewhere/encoder.onnx", ".."])
def test_a_graph_outside_the_export_directory_is_refused(shipped_float, tmp_path, name):
    """export.json names its graphs as file names beside it: an absolute path or one climbing out
    had loaded a graph from anywhere (its digest matching), one directory no longer one export."""
    _, task, out = shipped_float
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    manifest = json.loads((copy / MANIFEST).read_text())
    manifest["graphs"]["encoder"] = str(out / "encoder.onnx") if name == "absolute" else name
    (copy / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ExportError, match="the encoder graph is .*, not a file name beside export.json"):
        load_exported(copy, task.target_dictionary)


def test_a_format_of_another_type_says_which(shipped_float, tmp_path):
    _, task, out = shipped_float
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    manifest = json.loads((copy / MANIFEST).read_text())
    (copy / MANIFEST).write_text(json.dumps({**manifest, "format": str(manifest["format"])}))
    with pytest.raises(ExportError, match=r"export format '4' \(a str\); this qswap reads format 4, a number"):
        load_exported(copy, task.target_dictionary)


def test_an_encoder_named_as_the_ctc_graph_is_an_edited_manifest(shipped_float, tmp_path):
    """kind 'ctc' naming an S2T encoder (its digest copied too): blamed on the data directory's
    dictionary before ('the exported graph scores 176 tokens')."""
    _, task, out = shipped_float
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    manifest = json.loads((copy / MANIFEST).read_text())
    manifest.update(kind="ctc", graphs={"ctc": "encoder.onnx"}, digests={"ctc": manifest["digests"]["encoder"]})
    (copy / MANIFEST).write_text(json.dumps(resealed(manifest)))
    with pytest.raises(ExportError, match="export.json does not describe its graphs: the graph it names as 'ctc' "
                                          "takes src_lengths, src_tokens"):
        load_exported(copy, task.target_dictionary)


def test_lengths_beyond_the_features_are_a_data_error(shipped_float):
    """The graph sizes its padding mask by the features: a length past them unmasked the shorter
    utterance's padding and changed its transcript, with no error (fairseq's model raises)."""
    from qswap.errors import DataError
    from qswap.export.onnx import load_session, run_encoder

    _, task, out = shipped_float
    net = next(iter(fdata.batches(task, "test", max_sentences=2)))["net_input"]
    too_long = torch.full_like(net["src_lengths"], net["src_tokens"].shape[1] + 50)
    ort = load_exported(out, task.target_dictionary)
    for run in (lambda: ort.encoder(net["src_tokens"], too_long),
                lambda: run_encoder(load_session(out / "encoder.onnx"), net["src_tokens"], too_long)):
        with pytest.raises(DataError, match=r"src_lengths up to \d+ for features of \d+ frames"):
            run()
    assert ort.encoder(net["src_tokens"], net["src_lengths"])["encoder_out"][0].shape[1] == 2


def test_no_dictionary_is_a_typed_error(shipped_float):
    """dictionary=None had passed the dictionary check and raised len(None)'s TypeError."""
    _, _, out = shipped_float
    with pytest.raises(ExportError, match="needs the task's target dictionary .*got NoneType"):
        load_exported(out, None)


def test_a_graph_name_the_file_system_cannot_look_up_is_a_typed_error(shipped_float, tmp_path):
    """A graph name longer than NAME_MAX in an edited, resealed manifest: a raw OSError (errno 36)."""
    _, task, out = shipped_float
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    manifest = json.loads((copy / MANIFEST).read_text())
    manifest["graphs"] = {**manifest["graphs"], "encoder": "e" * 300 + ".onnx"}
    (copy / MANIFEST).write_text(json.dumps(resealed(manifest)))
    with pytest.raises(ExportError, match="file name cannot be looked up"):
        load_exported(copy, task.target_dictionary)


@pytest.mark.skipif(not hasattr(__import__("os"), "geteuid") or __import__("os").geteuid() == 0,
                    reason="root reads a file whatever its permissions")
def test_an_unreadable_graph_is_a_typed_error(shipped_float, tmp_path):
    """A deploy directory copied with another owner's permissions: a raw PermissionError."""
    _, task, out = shipped_float
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    (copy / "encoder.onnx").chmod(0)
    with pytest.raises(ExportError, match="cannot read the encoder graph"):
        load_exported(copy, task.target_dictionary)


def test_a_step_graph_cache_of_no_declared_shape_is_a_typed_error():
    """onnxruntime reports a shape-less or low-rank input as [] or a short list, never None: the
    check had indexed it (IndexError) instead of saying what the graph lacks."""
    from types import SimpleNamespace

    from qswap.export.runtime import _cache_shapes

    for shape in ([], ["batch", 4]):
        inputs = [SimpleNamespace(name=f"past_{kind}_0", shape=shape, type="tensor(float)") for kind in ("key", "value")]
        with pytest.raises(ExportError, match="no past_key_0 input of static heads and head size"):
            _cache_shapes(SimpleNamespace(get_inputs=lambda: inputs), 1)


def test_sessions_leave_failures_to_qswaps_own_error(shipped_float):
    """Severity 3 still printed onnxruntime's own coloured error line on stderr above the ExportError."""
    from qswap.export.onnx import load_session

    _, _, out = shipped_float
    assert load_session(out / "encoder.onnx").get_session_options().log_severity_level == 4
