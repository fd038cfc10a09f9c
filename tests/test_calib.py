"""Calibration texts (jlcm_gguf/calib.py): the Brown corpus untagged as plain text, the named texts and their
mix, and the errors of --calib."""
from __future__ import annotations

import pytest

from jlcm_gguf.calib import CALIBRATION_TEXTS, calibration_text, resolve_calibration, untag_brown


def test_untag_brown():
    tagged = ("\n\n\tThe/at jury/nn said/vbd ``/`` it/pps did/dod n't/* agree/vb ''/'' ,/, and/cc left/vbd "
              "(/( quickly/rb )/) ./.\n\n\n\tIt/pps 's/bez over/rp ./.\n")
    assert untag_brown(tagged) == 'The jury said "it didn\'t agree", and left (quickly).\nIt\'s over.'


def test_named_texts_and_their_mix():
    texts = {name: calibration_text(name).read_text(encoding="utf-8") for name in CALIBRATION_TEXTS}
    assert "In the beginning God created the heaven and the earth." in texts["kjv"]
    assert "The Fulton County Grand Jury said Friday an investigation" in texts["brown"]
    assert "/nn" not in texts["brown"] and "``" not in texts["brown"]
    words = {name: len(t.split()) for name, t in texts.items()}
    assert words["mix"] == words["kjv"] + words["brown"]
    assert 0.6e6 < words["kjv"] < 1.0e6 and 0.9e6 < words["brown"] < 1.3e6  # both ~1M words
    # the mix is both texts' documents in a shuffled order: both in every tenth of it
    kjv, brown = set(texts["kjv"].split("\n\n")), set(texts["brown"].split("\n\n"))
    docs = texts["mix"].split("\n\n")
    assert sorted(docs) == sorted(kjv | brown) and len(docs) == len(kjv) + len(brown)
    for i in range(10):
        part = docs[i * len(docs) // 10:(i + 1) * len(docs) // 10]
        assert any(d in kjv for d in part) and any(d in brown for d in part), i
    assert calibration_text("mix") == calibration_text("mix")  # cached


def test_calib_resolution(tmp_path):
    own = tmp_path / "mine.txt"
    assert resolve_calibration(own) == own
    assert resolve_calibration("brown") == calibration_text("brown")
    with pytest.raises(SystemExit, match="unknown calibration text 'bible'"):
        calibration_text("bible")
