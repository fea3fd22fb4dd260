from bench.first_last_share import share


def test_sd15_first_and_last_convolutions_are_a_negligible_share_of_the_macs():
    total_gmac, first_last_mmac = share()
    # 3x3 convs 4 -> 320 and 320 -> 4 at 64x64, batch 2: 2 x 2 x 4 x 320 x 9 x 4096 MACs exactly
    assert first_last_mmac * 1e6 == 2 * 2 * 4 * 320 * 9 * 64 * 64
    assert 700 < total_gmac < 900  # SD1.5 at 512x512 is ~400 GMAC per sample
    assert first_last_mmac / 1e3 / total_gmac < 3e-4
