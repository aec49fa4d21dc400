import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from interface_engine.hl7 import Delimiters, escape, peek, unescape


@pytest.mark.parametrize(("encoded", "text"), [
    ("A\\F\\B", "A|B"),
    ("A\\S\\B", "A^B"),
    ("A\\T\\B", "A&B"),
    ("A\\R\\B", "A~B"),
    ("A\\E\\B", "A\\B"),
    ("\\X0D\\\\X0A\\", "\r\n"),
    ("caf\\XC3A9\\", "café"),
    ("plain", "plain"),
    ("", ""),
])
def test_unescape_sequences(encoded, text):
    assert unescape(encoded) == text


@pytest.mark.parametrize("verbatim", [
    "line\\.br\\two", "\\H\\bold\\N\\", "\\.sp\\", "\\C2842\\x", "\\M2442\\", "\\Zlocal\\", "\\Q\\",
    "no end \\F", "lone \\", "\\X0\\", "\\XZZ\\", "\\XFF\\",  # odd hex, not hex, not UTF-8
])
def test_unknown_and_formatting_sequences_left_verbatim(verbatim):
    assert unescape(verbatim) == verbatim


def test_hex_with_other_codec():
    assert unescape("\\XE9\\", encoding="latin-1") == "é"


def test_custom_escape_character():
    assert unescape("A}F}B}E}C", "^~}&") == "A|B}C"
    assert escape("A|B}C", "^~}&") == "A}F}B}E}C"
    assert unescape("A\\F\\B", "^~}&") == "A\\F\\B"  # backslash is data here


def test_custom_field_separator():
    assert escape("a^b~c", "~|\\&", field_sep="^") == "a\\F\\b\\S\\c"
    assert unescape("a\\F\\b\\S\\c", "~|\\&", field_sep="^") == "a^b~c"


def test_from_header():
    h = peek(b"MSH^~|}&^APP^^^^^^ADT~A01^C1\r")
    assert escape("a^b|c}", h) == "a}F}b}R}c}E}"
    assert unescape("a}F}b}R}c}E}", h) == "a^b|c}"


def test_escape_order_and_controls():
    assert escape("\\F\\") == "\\E\\F\\E\\"
    assert escape("a|b^c~d&e\\f") == "a\\F\\b\\S\\c\\R\\d\\T\\e\\E\\f"
    assert escape("x\ry\nz\x0bw\x1cv") == "x\\X0D\\y\\X0A\\z\\X0B\\w\\X1C\\v"


def test_truncation_character_escaped():
    assert escape("Apt #5", "^~\\&#") == "Apt \\P\\5"
    assert unescape("Apt \\P\\5", "^~\\&#") == "Apt #5"
    assert escape("Apt #5") == "Apt #5"


def test_without_escape_character_special_characters_become_spaces():
    d = Delimiters("|", "^~")
    assert d.escape("a|b^c\rd") == "a b c d"
    assert d.unescape("a\\F\\b") == "a\\F\\b"


def test_duplicate_delimiters_are_absent():
    d = Delimiters("|", "^~\\\\&")
    assert (d.component_sep, d.repetition_sep, d.escape_char, d.subcomponent_sep, d.truncation_char) == \
        ("^", "~", "\\", "", "&")
    d = Delimiters("|", "^|\\&")
    assert d.repetition_sep == ""


FORBIDDEN = ("|", "^", "~", "&", "\r", "\n", "\x0b", "\x1c")
DELIMS = st.permutations(list("|^~\\&#!$%*+")).map(lambda p: (p[0], "".join(p[1:6])))


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_escape_round_trip_default(text):
    encoded = escape(text)
    assert unescape(encoded) == text
    assert not any(c in encoded for c in FORBIDDEN)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.characters(codec="utf-8") | st.sampled_from(list("|^~\\&#!$%*+\r\n\x0b\x1c"))), DELIMS)
def test_escape_round_trip_any_delimiters(text, delims):
    fs, enc = delims
    d = Delimiters(fs, enc)
    encoded = d.escape(text)
    assert d.unescape(encoded) == text
    structure = [fs, d.component_sep, d.repetition_sep, d.subcomponent_sep, d.truncation_char]
    assert not any(c in encoded for c in [*structure, "\r", "\n", "\x0b", "\x1c"] if c)
