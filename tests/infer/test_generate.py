from sftlab.chat_format import stop_token_ids
from sftlab.infer.generate import SamplingArgs, generate_replies, left_pad, split_reply


def test_left_pad_puts_padding_on_the_left():
    ids, mask = left_pad([[5, 6, 7], [8]], pad_id=0, device="cpu")
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_split_reply_cuts_at_the_first_stop_token(tokenizer):
    stops = stop_token_ids(tokenizer)
    hello = tokenizer.encode("Hello", add_special_tokens=False)
    user = tokenizer.convert_tokens_to_ids("<|user|>")
    reply = split_reply(tokenizer, hello + [user, tokenizer.eos_token_id], stops)
    assert (reply.text, reply.finish_reason, reply.new_tokens) == ("Hello", "stop", len(hello) + 1)
    assert split_reply(tokenizer, hello, stops).finish_reason == "length"


def test_batched_generation_matches_one_at_a_time_and_restores_train_mode(tiny_model_dir, tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).train()
    conversations = [[{"role": "user", "content": "你好"}], [{"role": "user", "content": "Who are you? Tell me."}]]
    greedy = SamplingArgs(max_new_tokens=6, temperature=0, repetition_penalty=1.0)
    batched = generate_replies(model, tokenizer, conversations, greedy)
    single = [generate_replies(model, tokenizer, [c], greedy)[0] for c in conversations]
    assert [r.text for r in batched] == [r.text for r in single]
    assert all(r.finish_reason == "length" and r.new_tokens == 6 for r in batched)  # a random model never stops
    assert model.training


def test_greedy_means_no_repetition_penalty_unless_given_and_sampling_keeps_the_tutorials():
    assert SamplingArgs(temperature=0).generate_kwargs() == {"do_sample": False, "repetition_penalty": 1.0}
    assert SamplingArgs(temperature=0, repetition_penalty=1.3).generate_kwargs()["repetition_penalty"] == 1.3
    assert SamplingArgs().generate_kwargs()["repetition_penalty"] == 1.2


def test_a_reply_cut_mid_character_drops_the_incomplete_bytes(tokenizer):
    stops = stop_token_ids(tokenizer)
    ids = tokenizer.encode("你好，今天天气很好", add_special_tokens=False)
    # cut inside the last character: byte-level tokens whose decoding ends in U+FFFD
    cuts = [n for n in range(1, len(ids)) if tokenizer.decode(ids[:n]).endswith("\ufffd")]
    assert cuts, "the tiny tokenizer splits some CJK character into several byte tokens"
    for n in cuts:
        reply = split_reply(tokenizer, ids[:n], stops)
        assert "\ufffd" not in reply.text and reply.finish_reason == "length" and reply.new_tokens == n
        assert "你好，今天天气很好".startswith(reply.text)


def test_progress_bar_counts_batches_or_the_tokens_of_one_reply(tiny_model_dir, tokenizer, monkeypatch):
    from transformers import AutoModelForCausalLM

    import sftlab.infer.generate as generate

    bars = []
    real_tqdm = generate.tqdm
    monkeypatch.setattr(generate, "tqdm", lambda *a, **k: bars.append(real_tqdm(*a, **{**k, "disable": False}))
                        or bars[-1])
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    greedy = SamplingArgs(max_new_tokens=5, temperature=0)
    one = [[{"role": "user", "content": "你好"}]]
    generate_replies(model, tokenizer, one, greedy, progress="doctor")
    assert bars[-1].desc == "doctor" and bars[-1].n == 5 and bars[-1].unit == "token"
    generate_replies(model, tokenizer, one * 3, greedy, batch_size=2, progress="replies")
    assert bars[-1].n == 2 and bars[-1].unit == "batch"


def test_generation_keeps_its_kv_cache_when_a_trainer_turned_it_off(tiny_model_dir, tokenizer):
    """The Trainer sets config.use_cache = False for training; probes, retention checks and the final evaluation
    generate with that model, and without a cache each new token recomputed the whole sequence (6-9x slower on
    SmolLM2-135M). The replies are the same either way."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    conversation = [{"role": "user", "content": "你是谁？"}]
    expected = generate_replies(model, tokenizer, [conversation], SamplingArgs(max_new_tokens=8, temperature=0))
    model.config.use_cache = False
    seen, generate = [], model.generate

    def recording(*args, **kwargs):
        seen.append(kwargs.get("use_cache"))
        return generate(*args, **kwargs)

    model.generate = recording
    assert generate_replies(model, tokenizer, [conversation], SamplingArgs(max_new_tokens=8, temperature=0)) == expected
    assert seen == [True]
