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


def test_token_ids_cache(smollm2, tmp_path, monkeypatch):
    """A text's token ids are cached per text and tokenizer: the cached ids are the tokenizer's, a changed text
    or another tokenizer is tokenized again, and a damaged cache file is replaced rather than trusted."""
    import numpy as np
    from transformers import AutoTokenizer

    from jlcm_gguf.calib import text_token_ids, token_ids
    monkeypatch.setenv("JLCM_CACHE", str(tmp_path / "cache"))
    text = tmp_path / "t.txt"
    text.write_text("In the beginning God created the heaven and the earth.\r\nAnd the earth was without form. " * 50)
    tok = AutoTokenizer.from_pretrained(str(smollm2))
    want = token_ids(tok, text.read_text(encoding="utf-8"))
    first = text_token_ids(text, tok)
    files = list((tmp_path / "cache").rglob("*.npy"))
    assert len(files) == 1 and np.array_equal(first, want) and first.dtype == np.int64
    files[0].write_bytes(np.load(files[0])[::-1].tobytes())  # not an .npy any more
    assert np.array_equal(text_token_ids(text, tok), want)  # tokenized again, replaced
    np.save(files[0], np.zeros(3, dtype=np.int32))  # a readable file is trusted: it is what the key names
    assert len(text_token_ids(text, tok)) == 3
    text.write_text("Another text entirely, with other words in it. " * 50)
    assert np.array_equal(text_token_ids(text, tok), token_ids(tok, text.read_text(encoding="utf-8")))
    other = AutoTokenizer.from_pretrained(str(smollm2))
    other.backend_tokenizer.normalizer = None if other.backend_tokenizer.normalizer else __import__(
        "tokenizers").normalizers.Lowercase()
    assert len(list((tmp_path / "cache").rglob("*.npy"))) == 2
    text_token_ids(text, other)
    assert len(list((tmp_path / "cache").rglob("*.npy"))) == 3
