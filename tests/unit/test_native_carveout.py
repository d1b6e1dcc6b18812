"""The preferred shared-memory carveout the decode kernels ask for (engines/native/carveout.py).

The driver rounds a carveout (a percent of the SM's shared memory) up to the next configuration,
so a hint must fall above the configuration below the one wanted and at or below that one."""

from engines.native.carveout import DECODE_SHARED_BYTES, carveout_percent

KB = 1024
H100_MAX = 228 * KB
H100_CONFIGS = [0, 8, 16, 32, 64, 100, 132, 164, 196, 228]


def configuration(percent: int, max_shared: int, configs: list[int]) -> int:
    """The configuration (KB) a hint of `percent` rounds up to."""
    hint = percent * max_shared / 100
    return next(size for size in configs if size * KB >= hint)


def test_small_kernels_land_on_the_decode_configuration():
    for need in (0, 20 * KB, 71 * KB, DECODE_SHARED_BYTES):
        percent = carveout_percent(need, H100_MAX)
        assert configuration(percent, H100_MAX, H100_CONFIGS) * KB == DECODE_SHARED_BYTES


def test_a_larger_need_keeps_every_resident_program():
    for need in (165 * KB, 200 * KB, 228 * KB):
        percent = carveout_percent(need, H100_MAX)
        assert percent * H100_MAX / 100 >= need
        assert configuration(percent, H100_MAX, H100_CONFIGS) * KB >= need


def test_a_gpu_with_less_shared_memory_gets_its_largest_configuration():
    a100_max = 164 * KB  # an A100's configurations end at 164 KB
    assert carveout_percent(10 * KB, a100_max) == 100
    assert carveout_percent(300 * KB, H100_MAX) == 100
