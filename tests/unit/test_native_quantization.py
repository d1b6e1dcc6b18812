"""lowbit's INT4 format on the CPU: exact packing, RTN within half a step, the reference layers."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from engines.native.linear import DenseLinear, Int4Linear, concatenated  # noqa: E402
from engines.native.quantization import (  # noqa: E402
    awq_input_scales,
    group_size_for,
    pack_int4,
    quantize_rtn,
    unpack_int4,
)


def test_pack_then_unpack_is_exact_for_every_value_and_position():
    generator = torch.Generator().manual_seed(0)
    values = torch.randint(0, 16, (37, 256), generator=generator, dtype=torch.uint8)
    values[0] = 15  # all bits set: the top nibble makes the word negative as int32
    packed = pack_int4(values)
    assert packed.dtype == torch.int32 and packed.shape == (37, 32)
    assert torch.equal(unpack_int4(packed), values)
    # The documented layout: value j (bits 4j..4j+3) of word w of a block is input 8j + w.
    for word in (0, 3, 8 + 5):
        block, w = divmod(word, 8)
        expected = sum(int(values[1, 64 * block + 8 * j + w]) << (4 * j) for j in range(8))
        assert (int(packed[1, word]) & 0xFFFFFFFF) == expected


def test_group_size_falls_back_to_a_divisor_of_the_inputs():
    assert group_size_for(4096) == 128
    assert group_size_for(576) == 64  # SmolLM2-135M's hidden size
    with pytest.raises(ValueError):
        group_size_for(100)
    with pytest.raises(ValueError):
        pack_int4(torch.zeros(2, 40, dtype=torch.uint8))


def test_rtn_error_is_half_a_step_inside_the_grid_and_under_a_step_at_its_ends():
    generator = torch.Generator().manual_seed(1)
    weight = torch.randn(64, 512, generator=generator) * 0.05
    quantized = quantize_rtn(weight)
    assert quantized.group_size == 128 and quantized.scales.dtype == torch.float16
    step = quantized.scales.float().repeat_interleave(128, dim=1)  # [N, K]
    error = (quantized.dequantize() - weight).abs()
    # The integer zero point shifts the grid by up to half a step, so a group's extreme value
    # may clip by that much; everything else rounds to the nearest point.
    assert (error <= step + 1e-6).all()
    assert (error <= step * 0.5 + 1e-6).float().mean() > 0.99
    assert unpack_int4(quantized.qweight).max() == 15  # the range is used, not wasted


def test_int4_linear_reference_is_dequantize_then_matmul_with_fused_epilogues():
    generator = torch.Generator().manual_seed(2)
    dense = DenseLinear(torch.randn(96, 256, generator=generator) * 0.05)
    int4 = dense.quantized()
    assert isinstance(int4, Int4Linear)
    x = torch.randn(5, 256, generator=generator)
    residual = torch.randn(5, 96, generator=generator)
    expected = x @ int4.int4.dequantize().T
    torch.testing.assert_close(int4(x), expected)
    torch.testing.assert_close(int4(x, residual=residual), expected + residual)
    gate, up = expected.chunk(2, dim=-1)
    torch.testing.assert_close(int4.gated(x), torch.nn.functional.silu(gate) * up)
    # The output error stays near what 16 levels per group allow.
    assert ((expected - dense(x)).norm() / dense(x).norm()).item() < 0.15  # ~step/sqrt(12) for Gaussian weights


def test_tiled_words_hold_each_group_of_128_rows_in_one_block_and_round_trip_exactly():
    generator = torch.Generator().manual_seed(5)
    weight = quantize_rtn(torch.randn(256, 384, generator=generator))
    tiled = weight.tile()
    assert tiled.tiled and tiled.qweight.shape == (2, 3, 128, 16) and tiled.qweight.is_contiguous()
    assert tiled.shape == weight.shape == (256, 384) and tiled.group_size == 128
    # Block (tile t, group g) is rows 128 t .. 128 t + 127, words 16 g .. 16 g + 15, row by row.
    assert torch.equal(tiled.qweight[1, 2], weight.qweight[128:256, 32:48])
    assert torch.equal(tiled.row_major().qweight, weight.qweight)
    assert torch.equal(tiled.dequantize(), weight.dequantize())
    assert tiled.tile() is tiled and weight.row_major() is weight
    # Where the blocks do not fit, the words stay row by row: N not a multiple of 128, groups of 64.
    for untileable in (quantize_rtn(torch.randn(192, 256, generator=generator)),
                       quantize_rtn(torch.randn(128, 320, generator=generator))):
        assert not untileable.can_tile() and untileable.tile() is untileable


def test_int4_linear_keeps_its_words_tiled_where_they_fit_and_computes_the_same():
    generator = torch.Generator().manual_seed(6)
    weight = quantize_rtn(torch.randn(256, 256, generator=generator) * 0.05)
    layer = Int4Linear(weight)
    assert layer.int4.tiled
    x = torch.randn(3, 256, generator=generator)
    torch.testing.assert_close(layer(x), x @ weight.dequantize().T)
    narrow = Int4Linear(quantize_rtn(torch.randn(96, 256, generator=generator)))
    fused = concatenated([layer, narrow])  # a tiled part and a row-major one: rows side by side
    assert not fused.int4.tiled  # 352 rows
    torch.testing.assert_close(fused(x), torch.cat([layer(x), narrow(x)], dim=-1))


def test_concatenated_layers_compute_their_parts_side_by_side():
    generator = torch.Generator().manual_seed(3)
    parts = [DenseLinear(torch.randn(n, 128, generator=generator)) for n in (64, 16, 16)]
    x = torch.randn(3, 128, generator=generator)
    fused = concatenated(parts)
    torch.testing.assert_close(fused(x), torch.cat([part(x) for part in parts], dim=-1))
    fused_int4 = concatenated([part.quantized() for part in parts])
    torch.testing.assert_close(fused_int4(x), torch.cat([part.quantized()(x) for part in parts], dim=-1))
    with pytest.raises(ValueError):
        concatenated([parts[0], parts[1].quantized()])


def test_awq_scales_lower_the_output_error_when_a_few_channels_dominate():
    generator = torch.Generator().manual_seed(4)
    weight = torch.randn(128, 256, generator=generator) * 0.05
    inputs = torch.randn(512, 256, generator=generator)
    inputs[:, :4] *= 50  # outlier channels, as real activations have
    reference = inputs @ weight.T
    plain = inputs @ quantize_rtn(weight).dequantize().T
    scales = awq_input_scales([weight], inputs)
    aware = inputs @ (quantize_rtn(weight * scales).dequantize() / scales).T
    plain_error = (plain - reference).pow(2).mean()
    aware_error = (aware - reference).pow(2).mean()
    assert aware_error < 0.8 * plain_error
