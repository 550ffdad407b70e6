"""Tests for audience_sync.naming: the trait-key rule of ENGAGE.md, vectors and properties."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from audience_sync.naming import TRAIT_KEY_PATTERN, dropped_non_ascii, trait_key

# Table 1 of ENGAGE.md: segmentio/go-snakecase's own test suite (snake_test.go), unchanged.
GO_SNAKECASE_VECTORS = [
    ("@49L0S145_¬fwHƒ0TSLNVp", "49l0s145_fw_h_0tslnvp"),
    ("lk0B@bFmjrLQ_Z6YL", "lk0_b_b_fmjr_lq_z6yl"),
    ("samPLE text", "sam_ple_text"),
    ("sample text", "sample_text"),
    ("sample-text", "sample_text"),
    ("sample_text", "sample_text"),
    ("sample___text", "sample_text"),
    ("sampleText", "sample_text"),
    ("inviteYourCustomersAddInvites", "invite_your_customers_add_invites"),
    ("sample 2 Text", "sample_2_text"),
    ("   sample   2    Text   ", "sample_2_text"),
    ("   $#$sample   2    Text   ", "sample_2_text"),
    ("SAMPLE 2 TEXT", "sample_2_text"),
    ("___$$Base64Encode", "base64_encode"),
    ("FOO:BAR$BAZ", "foo_bar_baz"),
    ("FOO#BAR#BAZ", "foo_bar_baz"),
    ("something.com", "something_com"),
    ("$something%", "something"),
    ("•¶§ƒ˚foo˙∆˚¬", "foo"),
    ("CStringRef", "cstring_ref"),
    ("5test", "5test"),
    ("test5", "test5"),
    ("THE5r", "the5r"),
    ("5TEst", "5test"),
    ("_5TEst", "5test"),
    ("@%#&5TEst", "5test"),
    ("edf_6N", "edf_6n"),
    ("f_pX9", "f_p_x9"),
    ("p_z9Rg", "p_z9_rg"),
    ("2FA Enabled", "2fa_enabled"),
    ("Enabled 2FA", "enabled_2fa"),
]

# Table 2 of ENGAGE.md: audience names.
AUDIENCE_NAME_VECTORS = [
    ("Order Completed Last 30days", "order_completed_last_30days"),  # the seed's example
    ("Order Completed Last 30 Days", "order_completed_last_30_days"),
    ("High Value Customers", "high_value_customers"),
    ("high-value customers!", "high_value_customers"),
    ("  High Value Customers  ", "high_value_customers"),
    ("VIP Users (EU)", "vip_users_eu"),
    ("Café Visitors", "caf_visitors"),
    ("🎉 Party", "party"),
]

# Examples quoted in the rule's prose (ENGAGE.md, point 2).
RULE_EXAMPLES = [
    ("HTTPServer", "httpserver"),
    ("Top10Users", "top10_users"),
    ("Café", "caf"),
]


def _has_ascii_alnum(text: str) -> bool:
    return any(c.isascii() and c.isalnum() for c in text)


@pytest.mark.parametrize(("name", "key"), GO_SNAKECASE_VECTORS)
def test_go_snakecase_vectors(name: str, key: str) -> None:
    assert trait_key(name) == key


@pytest.mark.parametrize(("name", "key"), AUDIENCE_NAME_VECTORS + RULE_EXAMPLES)
def test_audience_name_vectors(name: str, key: str) -> None:
    assert trait_key(name) == key


@pytest.mark.parametrize("name", ["🎉", "", "   ", "___", "$%&", "Ééü"])
def test_no_ascii_letters_or_digits_asks_for_an_explicit_key(name: str) -> None:
    with pytest.raises(ValueError, match="`key`") as excinfo:
        trait_key(name)
    assert repr(name) in str(excinfo.value)


@pytest.mark.parametrize(
    ("name", "dropped"),
    [
        ("Café Visitors", True),
        ("🎉 Party", True),
        ("High Value Customers", False),
        ("high-value customers!", False),
    ],
)
def test_dropped_non_ascii(name: str, dropped: bool) -> None:
    assert dropped_non_ascii(name) is dropped


@given(st.text())
def test_idempotent(name: str) -> None:
    try:
        key = trait_key(name)
    except ValueError:
        return
    assert trait_key(key) == key


@given(st.text())
def test_output_is_a_valid_key(name: str) -> None:
    try:
        key = trait_key(name)
    except ValueError:
        return
    assert TRAIT_KEY_PATTERN.fullmatch(key)
    assert set(key) <= set("abcdefghijklmnopqrstuvwxyz0123456789_")
    assert not key.startswith("_")
    assert not key.endswith("_")
    assert "__" not in key


@given(st.text())
def test_raises_exactly_when_no_ascii_letter_or_digit(name: str) -> None:
    if _has_ascii_alnum(name):
        trait_key(name)
    else:
        with pytest.raises(ValueError, match="`key`"):
            trait_key(name)


@pytest.mark.parametrize(
    "key", ["", "_vip", "vip_", "vip__eu", "VIP", "vip-eu", "caf\u00e9", "vip\n", "\nvip"]
)
def test_pattern_rejects_invalid_keys(key: str) -> None:
    assert TRAIT_KEY_PATTERN.match(key) is None


@given(st.from_regex(TRAIT_KEY_PATTERN, fullmatch=True))
def test_valid_keys_are_returned_unchanged(key: str) -> None:
    assert trait_key(key) == key


@given(st.text(alphabet=st.characters(codec="ascii")))
def test_ascii_names_drop_nothing(name: str) -> None:
    assert not dropped_non_ascii(name)
