#!/usr/bin/env python3
"""Site by site: where the integer encoder of the shipped S2T model (issue 16) writes other codes
than the fake-quant encoder for the SAME input codes.

The fake-quant encoder runs once on the first N test utterances with a hook on every quantizer
(its output codes); each integer op of ``qswap.integerize`` then runs on the fake-quant codes of
its own inputs, and its output codes are compared with the fake-quant codes of its consumer's
quantizer (valid frames only). Printed, one row per site kind and encoder layer span:

    python tools/integer_sites.py --recipe w8a8 --simulate integer --count 8
    python tools/integer_sites.py --recipe searched --subset test_heldout --skip 60 --count 30 --decoder
"""
from __future__ import annotations

import argparse
import sys
from collections import OrderedDict
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
ASSET = REPO / "qswap" / "assets" / "s2t_demo"


def _capture(model: torch.nn.Module) -> tuple[dict, list]:
    """Forward hooks on every enabled FakeQuantize of ``model``: {module: last output}."""
    from qswap.quant.fake_quantize import FakeQuantize
    seen, hooks = {}, []
    for module in model.modules():
        if isinstance(module, FakeQuantize) and module.enabled:
            hooks.append(module.register_forward_hook(lambda m, args, out: seen.__setitem__(m, out.detach())))
    return seen, hooks


def _codes(seen: dict, quant) -> torch.Tensor:
    from qswap.quant.integer import Grid
    return Grid.of(quant).quantize(seen[quant]).to(torch.int64)


class Tally:
    """Differences per site: {site: [outputs, different, largest |difference|]}."""

    def __init__(self):
        self.rows: "OrderedDict[str, list]" = OrderedDict()

    def add(self, site: str, integer: torch.Tensor, reference: torch.Tensor, keep: torch.Tensor | None = None):
        diff = (integer.to(torch.int64) - reference.to(torch.int64)).abs()
        if keep is not None:
            diff = diff[keep.expand_as(diff)]
        row = self.rows.setdefault(site, [0, 0, 0])
        row[0] += diff.numel()
        row[1] += int((diff != 0).sum())
        row[2] = max(row[2], int(diff.max()) if diff.numel() else 0)

    def render(self, title: str) -> str:
        lines = [title, "", "| site | outputs | different | different % | largest (steps) |", "|---|---|---|---|---|"]
        for site, (n, d, big) in self.rows.items():
            lines.append(f"| {site} | {n} | {d} | {100 * d / max(n, 1):.3f} | {big} |")
        return "\n".join(lines)


def encoder_sites(q, net_input: dict, tally: Tally) -> None:
    """Every integer op of ``q``'s pre-norm S2T transformer encoder on the fake-quant codes of
    its inputs, against the fake-quant codes of its output (``tally``)."""
    from qswap.quant.integer import Grid, apply_lut, rescaled_sum
    from qswap.nn.attention import split_heads
    enc = q.encoder
    key_grid = Grid.of(q.decoder.layers[0].encoder_attn.key_quant)
    integer = enc.to_integer(key_grid)
    seen, hooks = _capture(enc)
    src, lengths = net_input["src_tokens"], net_input["src_lengths"]
    try:
        with torch.no_grad():
            out = enc(src, lengths)["encoder_out"][0]
    finally:
        for h in hooks:
            h.remove()
    from fairseq.data.data_utils import lengths_to_padding_mask
    from qswap.nn.fairseq.subsample import subsampled_lengths
    padding = lengths_to_padding_mask(subsampled_lengths(lengths, enc.subsample.n_layers))  # (B, T')
    frames = (~padding.T).unsqueeze(-1)  # (T, B, 1) valid frames
    with torch.no_grad():
        # subsampler: each conv on its fake-quant input codes, each GLU on its fake-quant input codes
        sub, isub = enc.subsample, integer.subsample
        from qswap.quant.integer import integer_glu
        for i, (conv, iconv, glu) in enumerate(zip(sub.conv_layers, isub.convs, isub.glus)):
            tally.add(f"subsample conv{i} (requant onto GLU grid)", iconv(_codes(seen, conv.input_quant)),
                      _codes(seen, sub.glu_quant[i]))
            nxt = sub.conv_layers[i + 1].input_quant if i + 1 < len(sub.conv_layers) else enc.embed_quant
            glu_out = integer_glu(_codes(seen, sub.glu_quant[i]), glu, dim=1)  # (B, C, T)
            tally.add(f"subsample GLU{i}", glu_out if i + 1 < len(sub.conv_layers) else glu_out.permute(2, 0, 1),
                      _codes(seen, nxt))
        # the stream: embedded codes plus positions
        embed = _codes(seen, enc.embed_quant)
        stream = (embed.to(torch.int32) - integer.embed_zero_point) << integer.stream_bits
        from fairseq import utils
        positions = utils.make_positions(padding, integer.padding_idx)
        stream = stream + integer.positions[positions.T]
        for n, (layer, ilayer) in enumerate(zip(enc.transformer_layers, integer.layers)):
            attn, iattn = layer.self_attn, ilayer.attn
            tally.add("stream -> LayerNorm input (requant)", ilayer.norm1_in(stream),
                      _codes(seen, layer.self_attn_layer_norm.input_quant), frames)
            tally.add("stream -> residual (requant)", ilayer.residual1(stream), _codes(seen, layer.attn_residual_quant),
                      frames)
            tally.add("LayerNorm", ilayer.norm1(_codes(seen, layer.self_attn_layer_norm.input_quant)),
                      _codes(seen, attn.input_quant), frames)
            x = _codes(seen, attn.input_quant)
            for name, proj, quant in (("q", iattn.q_proj, attn.core.q_quant), ("k", iattn.k_proj, attn.core.k_quant),
                                      ("v", iattn.v_proj, attn.core.v_quant)):
                ref = _codes(seen, quant)  # (B*H, T, D)
                tally.add(f"{name} projection", split_heads(proj(x), attn.num_heads), ref)
            qc, kc, vc = (_codes(seen, quant) for quant in (attn.core.q_quant, attn.core.k_quant, attn.core.v_quant))
            core = iattn.core
            zq, zk, zv, zp = core.zero_points
            acc = torch.bmm(qc.to(torch.int32) - zq, (kc.to(torch.int32) - zk).transpose(1, 2))
            tally.add("attention scores q k^T (requant)", core.scores(acc), _codes(seen, attn.core.softmax_in_quant))
            from qswap.nn.attention import heads_padding
            pad = heads_padding(padding, attn.num_heads)
            from qswap.quant.integer import integer_softmax
            probs_ref = _codes(seen, attn.core.softmax_out_quant)
            softmax = integer_softmax(_codes(seen, attn.core.softmax_in_quant), core.softmax, pad)
            tally.add("softmax", softmax, probs_ref, ~pad)
            ctx = torch.bmm(probs_ref.to(torch.int32) - zp, vc.to(torch.int32) - zv)
            from qswap.nn.attention import merge_heads
            tally.add("attention context p v (requant)", merge_heads(core.context(ctx), attn.num_heads),
                      _codes(seen, attn.out_proj.input_quant), frames)
            tally.add("out projection", iattn.out_proj(_codes(seen, attn.out_proj.input_quant)),
                      _codes(seen, layer.attn_out_quant), frames)
            z_res1, z_out1, z_res2, z_out2 = ilayer.zero_points
            mid = rescaled_sum(_codes(seen, layer.attn_residual_quant), z_res1, _codes(seen, layer.attn_out_quant),
                               z_out1, ilayer.add1)
            tally.add("residual add -> LayerNorm input (requant)", ilayer.norm2_in(mid),
                      _codes(seen, layer.final_layer_norm.input_quant), frames)
            tally.add("residual add -> residual (requant)", ilayer.residual2(mid),
                      _codes(seen, layer.ffn_residual_quant), frames)
            tally.add("LayerNorm", ilayer.norm2(_codes(seen, layer.final_layer_norm.input_quant)),
                      _codes(seen, layer.fc1.input_quant), frames)
            tally.add("fc1", ilayer.fc1(_codes(seen, layer.fc1.input_quant)), _codes(seen, layer.ffn_act_quant), frames)
            tally.add("activation table", apply_lut(_codes(seen, layer.ffn_act_quant), *ilayer.act),
                      _codes(seen, layer.fc2.input_quant), frames)
            tally.add("fc2", ilayer.fc2(_codes(seen, layer.fc2.input_quant)), _codes(seen, layer.ffn_out_quant), frames)
            stream = rescaled_sum(_codes(seen, layer.ffn_residual_quant), z_res2, _codes(seen, layer.ffn_out_quant),
                                  z_out2, ilayer.add2)
        if integer.norm_in is not None:
            tally.add("stream -> final LayerNorm input (requant)", integer.norm_in(stream),
                      _codes(seen, enc.layer_norm.input_quant), frames)
            tally.add("final LayerNorm (onto key grid)", integer.norms[0](_codes(seen, enc.layer_norm.input_quant)),
                      key_grid.quantize(out).to(torch.int64), frames)


def decoder_sites(q, net_input: dict, tally: Tally) -> None:
    """The integer decoder's residual stream, norms, encoder-output readers and output projection
    of ``q``'s pre-norm S2T decoder, teacher-forced, on the fake-quant codes of their inputs,
    against the fake-quant codes of their readers (``tally``; target positions only). The
    attentions and FFNs inside are the encoder's forms (``encoder_sites``)."""
    from fairseq import utils

    from qswap.quant.integer import rescaled_sum
    import qswap
    imodel = qswap.integerize(q)
    dec, idec, enc, ienc = q.decoder, imodel.decoder, q.encoder, imodel.encoder
    seen, hooks = _capture(q)
    try:
        with torch.no_grad():
            q(**net_input)
    finally:
        for h in hooks:
            h.remove()
    prev = net_input["prev_output_tokens"]
    tokens = (prev != dec.padding_idx).T.unsqueeze(-1)  # (T, B, 1)
    stream = (idec.tokens[prev] + idec.positions[utils.make_positions(prev, dec.padding_idx)]).transpose(0, 1)
    with torch.no_grad():
        for n, (layer, ilayer) in enumerate(zip(dec.layers, idec.layers)):
            norms = (layer.self_attn_layer_norm, layer.encoder_attn_layer_norm, layer.final_layer_norm)
            readers = (layer.self_attn.input_quant, layer.encoder_attn.input_quant, layer.fc1.input_quant)
            residuals = (layer.attn_residual_quant, layer.cross_residual_quant, layer.ffn_residual_quant)
            outs = (layer.attn_out_quant, layer.cross_out_quant, layer.ffn_out_quant)
            where = "decoder stream (tokens + positions)" if n == 0 else "decoder stream"
            for i in range(3):
                tally.add(f"{where if i == 0 else 'decoder stream'} -> LayerNorm input (requant)",
                          ilayer.norms_in[i](stream), _codes(seen, norms[i].input_quant), tokens)
                tally.add(f"{where if i == 0 else 'decoder stream'} -> residual (requant)",
                          ilayer.residuals[i](stream), _codes(seen, residuals[i]), tokens)
                tally.add("decoder LayerNorm", ilayer.norms[i](_codes(seen, norms[i].input_quant)),
                          _codes(seen, readers[i]), tokens)
                z_res, z_out = ilayer.zero_points[i]
                stream = rescaled_sum(_codes(seen, residuals[i]), z_res, _codes(seen, outs[i]), z_out, ilayer.adds[i])
            tally.add("encoder final LayerNorm -> each decoder layer's key grid",
                      ienc.norms[n](_codes(seen, enc.layer_norm.input_quant)),
                      _codes(seen, layer.encoder_attn.key_quant))
        tally.add("decoder stream -> final LayerNorm input (requant)", idec.norm_in(stream),
                  _codes(seen, dec.layer_norm.input_quant), tokens)
        tally.add("decoder final LayerNorm", idec.norm(_codes(seen, dec.layer_norm.input_quant)),
                  _codes(seen, dec.output_projection.input_quant).transpose(0, 1), tokens)
        tally.add("output projection (onto the logits grid)",
                  idec.output_projection(_codes(seen, dec.output_projection.input_quant)),
                  _codes(seen, q.logits_quant), tokens.transpose(0, 1))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="w8a8", help="a shipped recipe name or a recipe YAML path")
    parser.add_argument("--simulate", choices=("float", "integer"), default="integer")
    parser.add_argument("--count", type=int, default=8, help="utterances")
    parser.add_argument("--subset", default="test", help="the shipped test set (test, test_heldout)")
    parser.add_argument("--skip", type=int, default=0, help="start after this many utterances")
    parser.add_argument("--decoder", action="store_true", help="the decoder's sites too (teacher-forced)")
    parser.add_argument("--calib-batches", type=int, default=4)
    args = parser.parse_args(argv)
    sys.path[:0] = [str(REPO), str(REPO / "tools")]
    torch.set_num_threads(1)
    import qswap
    from qswap.integration import data as fdata
    from qswap.recipe import with_simulate
    model, task = fdata.load_model_and_task(ASSET / "checkpoint.pt", ASSET)
    recipe = qswap.load_recipe(str(ASSET / "searched.yaml") if args.recipe == "searched" else args.recipe)
    q = qswap.convert(model, with_simulate(recipe, args.simulate))
    qswap.calibrate(q, fdata.net_inputs(task, "train_calib", args.calib_batches, max_sentences=32))
    dataset = fdata.load_subset(task, args.subset)
    sample = dataset.collater([dataset[i] for i in range(args.skip, min(args.skip + args.count, len(dataset)))])
    tally = Tally()
    encoder_sites(q, sample["net_input"], tally)
    if args.decoder:
        decoder_sites(q, sample["net_input"], tally)
    print(tally.render(f"{args.recipe}, simulate {args.simulate}, {args.subset} utterances {args.skip} to "
                       f"{args.skip + args.count - 1}, sites:"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
