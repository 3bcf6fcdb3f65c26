"""One test per assumption sftlab makes about a private or internal API (internals.py): after an upgrade of
transformers, TRL or tokenizers, these fail first and name what moved."""

import inspect

import torch
from transformers import PretrainedConfig, Trainer, TrainerCallback
from transformers.utils.chat_template_utils import render_jinja_template

from sftlab import internals


def test_transformers_compiles_chat_templates_as_apply_chat_template_does(tokenizer):
    compiled = internals.compiled_template(tokenizer.chat_template)
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    rendered, _ = render_jinja_template(conversations=[messages], chat_template=tokenizer.chat_template,
                                        **tokenizer.special_tokens_map)
    assert compiled is not None
    assert compiled.render(messages=messages, **tokenizer.special_tokens_map) == rendered[0]


def test_a_fast_tokenizer_holds_the_rust_tokenizer(tokenizer):
    import tokenizers

    backend = internals.rust_tokenizer(tokenizer)
    assert isinstance(backend, tokenizers.Tokenizer)
    assert backend.encode("hello", add_special_tokens=False).ids == tokenizer.encode("hello", add_special_tokens=False)


def test_the_trainer_passes_a_batch_rebalance_sampler_as_the_batch_sampler_unsharded():
    source = inspect.getsource(Trainer)
    base = internals.batch_sampler_base()
    assert base.__name__ == "BatchRebalanceSampler"
    assert source.count(f"isinstance(sampler, {base.__name__})") >= 2  # batch_sampler=, and no BatchSamplerShard


def test_argparse_lists_what_a_parser_fills():
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--max-queue", dest="max_queue")
    parser.add_argument("inputs", nargs="*")
    assert internals.parser_fields(parser) == {"help", "max_queue", "inputs"}


def test_the_methods_sftlab_overrides_exist_with_the_parameters_it_expects():
    for name, parameters in {**internals.OVERRIDDEN_TRAINER_METHODS, **internals.USED_TRAINER_METHODS}.items():
        assert tuple(inspect.signature(getattr(Trainer, name)).parameters) == parameters


def test_the_dpo_and_kto_method_sftlab_overrides_exists_with_the_parameters_it_expects():
    from trl import DPOTrainer, KTOTrainer

    for trainer in (DPOTrainer, KTOTrainer):
        for name, parameters in internals.OVERRIDDEN_DPO_METHODS.items():
            assert tuple(inspect.signature(getattr(trainer, name)).parameters) == parameters


def test_the_simpo_and_orpo_method_sftlab_overrides_exists_with_the_parameters_it_expects():
    from trl.experimental.cpo import CPOTrainer
    from trl.experimental.orpo import ORPOTrainer

    for trainer in (CPOTrainer, ORPOTrainer):
        for name, parameters in internals.OVERRIDDEN_PREFERENCE_METHODS.items():
            assert tuple(inspect.signature(getattr(trainer, name)).parameters) == parameters


def test_trls_collator_packs_a_padding_free_row_with_positions_restarting_per_sample():
    collator = internals.sft_collator(pad_token_id=0, padding_free=True)
    batch = collator([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8, 9], "labels": [-100, 9]}])
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert batch["labels"].tolist() == [[-100, 6, 7, -100, 9]]


def test_trls_chunked_kernel_and_fused_output_are_where_sftlab_imports_them():
    function, output = internals.chunked_logprob()
    assert issubclass(function, torch.autograd.Function)
    assert {"loss", "log_probs"} <= set(inspect.signature(output).parameters)


def test_the_trainers_logging_state_lives_in_the_attributes_sftlab_saves_and_restores():
    from trl import SFTTrainer

    source = inspect.getsource(Trainer)
    for attribute in ("self._tr_loss", "self._globalstep_last_logged", "self._total_loss_scalar"):
        assert attribute in source
    sft = inspect.getsource(SFTTrainer)
    assert "self._metrics" in sft and "self._total_train_tokens" in sft


def test_the_bad_step_guard_runs_between_clipping_and_the_optimizer_step():
    source = inspect.getsource(Trainer)
    clip, hook, step = (source.index(s) for s in ("_clip_grad_norm(model)", "on_pre_optimizer_step(",
                                                   "self.optimizer.step()"))
    assert clip < hook < step and hasattr(TrainerCallback, "on_pre_optimizer_step")


def test_checkpoints_are_named_as_sftlab_expects():
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    class Args:
        output_dir = "/runs/a"

    assert PREFIX_CHECKPOINT_DIR == "checkpoint"
    assert str(internals.checkpoint_dir(Args, 6)) == "/runs/a/checkpoint-6"


def test_a_configs_recorded_name_and_attention_are_the_private_fields_sftlab_sets_and_reads():
    config = PretrainedConfig()
    config._attn_implementation = "sdpa"

    class Model:
        pass

    model = Model()
    model.config = config
    internals.set_recorded_name(model, "sftlab:tiny-glm4")
    assert config.name_or_path == "sftlab:tiny-glm4" and internals.attention_of(model) == "sdpa"
