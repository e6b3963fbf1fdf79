"""The arithmetic behind the default GPU memory shares of the two engines."""

import pytest

from beam_captions.inference.gpu_budget import (
    MAX_TOTAL_SHARE, MODEL_SPECS, PAIR_SHARES, SOLO_SHARE, kv_token_capacity, memory_shares,
)

H100_80GB_GIB = 79.6  # what CUDA reports for an 80 GB card
MAX_MODEL_LEN = 32768


def test_default_shares_alone_and_paired():
    assert memory_shares(False) == (SOLO_SHARE, None)
    assert memory_shares(True) == PAIR_SHARES
    assert sum(PAIR_SHARES) <= MAX_TOTAL_SHARE


@pytest.mark.parametrize("captioner, enhancer", [
    ("Qwen/Qwen2.5-VL-7B-Instruct", "Qwen/Qwen2.5-14B-Instruct"),
    ("Qwen/Qwen3-VL-8B-Instruct", "Qwen/Qwen3-14B"),
])
def test_7b_vl_and_14b_text_fit_one_80gb_gpu_in_bf16(captioner, enhancer):
    caption_share, enhance_share = memory_shares(True)
    assert kv_token_capacity(MODEL_SPECS[captioner], H100_80GB_GIB, caption_share) >= MAX_MODEL_LEN
    assert kv_token_capacity(MODEL_SPECS[enhancer], H100_80GB_GIB, enhance_share) >= MAX_MODEL_LEN


def test_the_14b_model_does_not_fit_the_captioner_share_so_the_split_matters():
    caption_share, _ = memory_shares(True)
    assert kv_token_capacity(MODEL_SPECS["Qwen/Qwen2.5-14B-Instruct"], H100_80GB_GIB, caption_share) == 0
    # fp8 halves the weights: the 14B model then fits even the smaller share.
    assert kv_token_capacity(MODEL_SPECS["Qwen/Qwen2.5-14B-Instruct"], H100_80GB_GIB, caption_share, fp8=True) >= MAX_MODEL_LEN


def test_overcommitted_shares_are_refused():
    with pytest.raises(ValueError, match="add up to 1.10"):
        memory_shares(True, 0.5, 0.6)
    assert memory_shares(True, 0.3, 0.6) == (0.3, 0.6)
    assert memory_shares(False, 0.7) == (0.7, None)
