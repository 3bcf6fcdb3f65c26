"""The serving engine's incremental decoding: each token is decoded once, and the text it builds is the reply's
whole decode at every step where no character is split (a split one is held back, never shown broken)."""

from types import SimpleNamespace

from sftlab.infer.engine import Engine, Job


def test_incremental_decoding_equals_decoding_the_whole_reply(tokenizer):
    engine = Engine.__new__(Engine)  # the decoding alone: no model, no worker thread
    engine.tokenizer, engine.stop_ids, engine.opening = tokenizer, set(), ""
    engine.backend = tokenizer.backend_tokenizer
    text = "你好，世界! Tokens: 1234 🙂 done."
    ids = tokenizer.encode(text, add_special_tokens=False)
    job = Job(prompt=[], max_tokens=100, temperature=0, top_p=1)
    shown = []
    for i, token in enumerate(ids):
        job.tokens.append(token)
        job.raw += engine.decode_step(job, token)
        whole = tokenizer.decode(ids[:i + 1], skip_special_tokens=True)
        assert whole.startswith(job.raw) and "\ufffd" not in job.raw
        shown.append(job.raw)
    assert job.raw == tokenizer.decode(ids, skip_special_tokens=True) == text
    assert len(set(shown)) < len(ids)  # the emoji's bytes came in several tokens, held back until whole


def test_without_a_rust_tokenizer_the_whole_reply_is_decoded_again(tokenizer):
    engine = Engine.__new__(Engine)
    engine.tokenizer, engine.stop_ids, engine.backend = tokenizer, set(), None
    ids = tokenizer.encode("你好 world", add_special_tokens=False)
    job = SimpleNamespace(tokens=[], raw="", decoder=None)
    for token in ids:
        job.tokens.append(token)
        job.raw += engine.decode_step(job, token)
    assert job.raw == "你好 world"
