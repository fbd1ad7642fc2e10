"""tools/stream_logits.py: transformers' logits one decoder layer at a time, with stored or fake-quantized
weights, equal to transformers' whole-model run."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers

from tests.fixtures.tool_modules import tool_module


@pytest.fixture(scope="module")
def tools():
    bench = tool_module("bench_scale")
    stream = tool_module("stream_logits")
    yield next(bench), next(stream)
    for generator in (stream, bench):
        generator.close()


@pytest.fixture(scope="module")
def checkpoint(tools, tmp_path_factory):
    bench, _ = tools
    folder = tmp_path_factory.mktemp("stream") / "checkpoint"
    bench.make_checkpoint(folder, bench.Shape(hidden=64, layers=3, intermediate=128, vocab=1024, heads=4, kv_heads=2))
    return folder


def _whole(folder, ids, dtype, transform=None) -> np.ndarray:
    model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype, local_files_only=True)
    if transform is not None:
        with torch.no_grad():
            for module in model.model.layers.modules():
                if isinstance(module, torch.nn.Linear):
                    module.weight.copy_(transform(module.weight.float()).to(dtype))
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(ids)).logits[0].double().numpy()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_streamed_logits_are_transformers_whole_model_logits(tools, checkpoint, dtype):
    _, stream = tools
    ids = np.random.default_rng(1).integers(3, 300, size=(1, 7), dtype=np.int64)
    got = stream.stream_logits(checkpoint, ids, dtype)
    assert got.shape == (7, 1024)
    np.testing.assert_array_equal(got, _whole(checkpoint, ids, dtype))


def test_fake_quantized_weights_are_those_of_the_layers_only(tools, checkpoint):
    _, stream = tools
    ids = np.random.default_rng(2).integers(3, 300, size=(1, 5), dtype=np.int64)
    got = stream.stream_logits(checkpoint, ids, torch.float32, "rtn3", group=32)
    want = _whole(checkpoint, ids, torch.float32, lambda w: stream.fake_quantize_minmax(w, 3, 32))
    np.testing.assert_array_equal(got, want)
    stored = stream.stream_logits(checkpoint, ids, torch.float32)
    assert stream.cosine(got, stored) < 0.9999  # 3 bits change the logits


def test_minmax_rounding_is_optc_rtn_without_clip(tools):
    from optc.passes.lowbit import Grid, fake_quantize

    _, stream = tools
    w = torch.randn(48, 256, generator=torch.Generator().manual_seed(0)) * 0.02
    w[3, :128] = 0  # an all-zero group keeps scale 1
    for bits in (4, 8):
        mine = stream.fake_quantize_minmax(w, bits, 128)
        torch.testing.assert_close(mine, fake_quantize(w, 128, Grid(bits, True)), rtol=0, atol=0)
        step = w.reshape(48, 2, 128).abs().amax(dim=2, keepdim=True) / ((1 << (bits - 1)) - 1)
        assert bool(((mine - w).reshape(48, 2, 128).abs() <= step / 2 + 1e-9).all())
    with pytest.raises(ValueError, match="multiple of the group"):
        stream.fake_quantize_minmax(w[:, :200], 8, 128)


def test_cli_saves_and_compares(tools, checkpoint, tmp_path, capsys):
    _, stream = tools
    saved = tmp_path / "bf16.npy"
    assert stream.main([str(checkpoint), "--dtype", "bfloat16", "--tokens", "6", "--save", str(saved)]) == 0
    assert np.load(saved).shape == (6, 1024)
    assert stream.main([str(checkpoint), "--tokens", "6", "--weights", "rtn8-clip", "--against", str(saved)]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("cosine(rtn8-clip in float32, bf16.npy) ")
    assert 0.999 < float(line.split()[-1]) <= 1.0
