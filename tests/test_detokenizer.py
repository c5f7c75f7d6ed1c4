"""Incremental detokenization: deltas add up to the full decode; stop strings never leak."""

from transformers import AutoTokenizer

from optgptq.engine.detokenizer import IncrementalDetokenizer

TEXT = "Naïve café owners — 東京 and Zürich — said: stop here, then END of story."


def test_deltas_concatenate_to_full_text(smollm2_path):
    tok = AutoTokenizer.from_pretrained(str(smollm2_path))
    ids = tok.encode(TEXT, add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, tok.encode("Prompt:"), stop=[])
    pieces = []
    for t in ids:
        assert detok.add(t) is None
        pieces.append(detok.delta(finished=False))
    pieces.append(detok.delta(finished=True))
    assert "".join(pieces) == tok.decode(ids) == detok.text
    assert all("\ufffd" not in p for p in pieces)


def test_stop_string_is_cut_and_never_streamed(smollm2_path):
    tok = AutoTokenizer.from_pretrained(str(smollm2_path))
    ids = tok.encode(TEXT, add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, [], stop=["END", "then END"])
    streamed = ""
    for t in ids:
        hit = detok.add(t)
        streamed += detok.delta(finished=hit is not None)
        if hit is not None:
            break
    assert hit == "then END"  # the earliest match wins
    assert streamed == detok.text == TEXT[:TEXT.index("then END")]
