"""Record-level checks: captions, path containment, keys, hashed splits."""

from __future__ import annotations

from pathlib import Path

import pytest

from data_prep.records import Reason, RecordRejected, clean_caption, hashed_split, safe_join, sample_key


def test_caption_whitespace_is_stripped_inside_kept():
    # ROCO captions start with a space after the tab: stripped; inner spacing kept byte for byte.
    assert clean_caption(" Axial CT  of the pelvis.\n") == ("Axial CT  of the pelvis.", None)


@pytest.mark.parametrize(
    ("caption", "reason"),
    [
        (None, Reason.EMPTY_CAPTION),
        ("", Reason.EMPTY_CAPTION),
        (" \t\n ", Reason.EMPTY_CAPTION),
        (b"caf\xe9 au lait", Reason.UNDECODABLE_TEXT),  # Latin-1 byte, not UTF-8
        ("bad \udce9 byte", Reason.UNDECODABLE_TEXT),  # what errors="surrogateescape" leaves
        ("lone \ud800 surrogate", Reason.UNDECODABLE_TEXT),  # JSON "\ud800" escape
    ],
)
def test_bad_captions_have_reasons(caption, reason):
    assert clean_caption(caption) == (None, reason)


def test_min_caption_words():
    assert clean_caption("Chest x-ray", min_words=3) == (None, Reason.CAPTION_TOO_SHORT)
    assert clean_caption("Chest x-ray today", min_words=3)[1] is None
    assert clean_caption("Ré-évaluation".encode())[0] == "Ré-évaluation"


@pytest.mark.parametrize("bad", ["../x.jpg", "a/../../x.jpg", "/etc/passwd", "C:\\x.jpg", "..\\x.jpg"])
def test_paths_escaping_the_root_are_refused(bad):
    with pytest.raises(RecordRejected) as e:
        safe_join(Path("/data/images"), bad)
    assert e.value.reason == Reason.PATH_ESCAPE


def test_relative_paths_join():
    assert safe_join(Path("/data"), "a/b.jpg") == Path("/data/a/b.jpg")
    assert safe_join(Path("/data"), "a\\b.jpg") == Path("/data/a/b.jpg")


def test_keys_are_webdataset_safe_and_distinct():
    key = sample_key("medicat", "26491ab_3-Figure4-1.png")
    assert "." not in key and "/" not in key and key.startswith("medicat_")
    long_a, long_b = sample_key("x", "a" * 300 + "1"), sample_key("x", "a" * 300 + "2")
    assert len(long_a) <= 120 and long_a != long_b


def test_hashed_split_is_stable_and_roughly_proportional():
    splits = [hashed_split(f"paper{i}", 0, 0.1, 0.2) for i in range(2000)]
    assert splits == [hashed_split(f"paper{i}", 0, 0.1, 0.2) for i in range(2000)]
    assert 0.15 < splits.count("test") / 2000 < 0.25 and 0.06 < splits.count("val") / 2000 < 0.14
    assert hashed_split("paper1", 0, 0.0, 0.0) == "train"
