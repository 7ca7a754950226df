from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from popdrop.core.errors import PopdropError
from popdrop.vouchers import codes

prefixes = st.sampled_from(["", "WKND", "A", "P9X"])
noise = st.lists(st.sampled_from(["-", " ", ""]), min_size=0, max_size=3)


@given(prefix=prefixes, data=st.data())
def test_any_case_and_dashes_normalize_to_the_same_code(prefix: str, data: st.DataObject) -> None:
    code = codes.new_code(prefix)
    printed = codes.format_code(code)
    assert printed.count("-") == (4 if prefix else 3)
    lowered = "".join(
        ch.lower() if data.draw(st.booleans()) else ch for ch in printed.replace("-", "")
    )
    spaced = " ".join(lowered[i : i + 3] for i in range(0, len(lowered), 3))
    assert codes.normalize(printed) == code
    assert codes.normalize(spaced) == code


def test_printed_form_has_groups_and_a_check_character() -> None:
    printed = codes.format_code(codes.new_code())
    groups = printed.split("-")
    assert [len(g) for g in groups] == [4, 4, 4, 1]
    assert not set(printed.replace("-", "")) & set("ILOU")


def test_codes_carry_60_random_bits() -> None:
    assert codes.BODY_BITS >= 60
    batch = {codes.new_code() for _ in range(20_000)}
    assert len(batch) == 20_000


def test_look_alike_letters_fold_to_digits() -> None:
    code = codes.new_code()
    typed = code.replace("0", "O").replace("1", "I")
    assert codes.normalize(typed) == code


@given(position=st.integers(min_value=0, max_value=12), replacement=st.sampled_from(codes.ALPHABET))
def test_any_single_mistyped_character_is_refused(position: int, replacement: str) -> None:
    code = codes.new_code()
    if code[position] == replacement:
        return
    typo = code[:position] + replacement + code[position + 1 :]
    with pytest.raises(PopdropError) as refused:
        codes.normalize(typo)
    assert refused.value.reason == "malformed"
    assert "check character" in refused.value.message


def test_most_adjacent_swaps_are_refused() -> None:
    caught = total = 0
    for _ in range(500):
        code = codes.new_code()
        for i in range(len(code) - 1):
            if code[i] == code[i + 1]:
                continue
            total += 1
            swapped = code[:i] + code[i + 1] + code[i] + code[i + 2 :]
            try:
                codes.normalize(swapped)
            except PopdropError:
                caught += 1
    assert caught / total > 0.99


@pytest.mark.parametrize(
    "raw",
    ["", "ABC", "U" * 13, "!!!!-!!!!-!!!!-!", "A" * 40, "WKND-ABCD-EFGH-JKMN-PQRS-T"],
)
def test_malformed_input_is_refused_before_any_lookup(raw: str) -> None:
    with pytest.raises(PopdropError) as refused:
        codes.normalize(raw)
    assert refused.value.reason == "malformed"


def test_prefix_must_use_the_code_alphabet() -> None:
    assert codes.validate_prefix("wknd") == "WKND"
    for bad in ("POP", "LOL", "TOOLONGX", "A-B"):
        with pytest.raises(PopdropError):
            codes.validate_prefix(bad)


def test_derived_codes_are_stable_and_valid() -> None:
    mac = bytes(range(32))
    first = codes.derived_code("AB", mac)
    assert first == codes.derived_code("AB", mac)
    assert codes.normalize(codes.format_code(first)) == first
