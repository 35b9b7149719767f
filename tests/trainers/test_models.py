"""Model resolution: presets by module inspection on several architectures, offline configs, random models."""

import pytest
import torch
from transformers import GPT2Config, GPTNeoXConfig

from trainers.models import ModelError, load_config, materialize_random, meta_model, resolve_targets


def test_presets_on_llama():
    model = meta_model(load_config("random:tiny-llama"))
    assert resolve_targets(model, "attention") == ("q_proj", "v_proj")
    assert resolve_targets(model, "all_linear") == (
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head")


@pytest.mark.parametrize("config, attention, all_linear", [
    (GPTNeoXConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=256),
     ("query_key_value",), ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h", "lm_head")),
    (GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=256, bos_token_id=0, eos_token_id=0),
     ("c_attn",), ("c_attn", "c_proj", "c_fc", "lm_head")),
], ids=["gpt-neox", "gpt2"])
def test_presets_on_other_architectures(config, attention, all_linear):
    model = meta_model(config)
    assert resolve_targets(model, "attention") == attention
    assert resolve_targets(model, "all_linear") == all_linear


def test_explicit_names_must_exist():
    model = meta_model(load_config("random:tiny-llama"))
    assert resolve_targets(model, ("k_proj", "down_proj")) == ("k_proj", "down_proj")
    with pytest.raises(ModelError, match="module 'query' matches no Linear layer"):
        resolve_targets(model, ("query",))


def test_hub_config_offline_uses_bundled_copy_or_says_how_to_fix():
    cfg = load_config("openlm-research/open_llama_3b_v2")
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.intermediate_size, cfg.vocab_size) == (3200, 26, 8640, 32000)
    assert cfg.tie_word_embeddings is False
    with pytest.raises(ModelError, match="Hub is unreachable.*local checkpoint directory"):
        load_config("someone/unknown-model")
    with pytest.raises(ModelError, match="unknown bundled model 'random:nope'"):
        load_config("random:nope")


def test_random_model_is_materialized_once_and_seeded(model_cache):
    from transformers import AutoModelForCausalLM

    a = materialize_random("tiny-llama", seed=3)
    stamp = (a / "model.safetensors").stat().st_mtime_ns
    assert materialize_random("tiny-llama", seed=3) == a
    assert (a / "model.safetensors").stat().st_mtime_ns == stamp  # not rebuilt
    assert (a / "tokenizer.json").is_file()
    b = materialize_random("tiny-llama", seed=4)
    wa = AutoModelForCausalLM.from_pretrained(a).model.layers[0].self_attn.q_proj.weight
    wb = AutoModelForCausalLM.from_pretrained(b).model.layers[0].self_attn.q_proj.weight
    assert not torch.equal(wa, wb) and wa.std() > 0


def test_prebuild_writes_the_random_base_a_trial_then_reads(model_cache):
    """The driver's prebuild (a child process, all cores) writes the same checkpoint a trial would build."""
    from trainers.random_bases import prebuild_random

    torch.set_num_threads(1)  # as Ray leaves a trial
    build = prebuild_random({("tiny-llama", 11), ("tiny-llama", 12)})
    assert build.wait() == 0  # one child builds them all while the driver starts Ray
    assert prebuild_random({("tiny-llama", 11), ("tiny-llama", 12)}) is None  # nothing left to build
    assert (model_cache / "random" / "tiny-llama-seed12" / "config.json").is_file()
    built = model_cache / "random" / "tiny-llama-seed11"
    assert (built / "config.json").is_file() and (built / "tokenizer.json").is_file()
    stamp = (built / "model.safetensors").stat().st_mtime_ns
    assert materialize_random("tiny-llama", seed=11) == built
    assert (built / "model.safetensors").stat().st_mtime_ns == stamp  # the trial reused it
    assert torch.get_num_threads() == 1
    same = model_cache / "same"
    torch.manual_seed(11)
    from transformers import AutoConfig, AutoModelForCausalLM

    from trainers.models import ASSETS
    ref = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(ASSETS / "tiny-llama"), dtype=torch.bfloat16)
    ref.save_pretrained(same)
    got = AutoModelForCausalLM.from_pretrained(built).model.layers[0].mlp.up_proj.weight
    assert torch.equal(got, AutoModelForCausalLM.from_pretrained(same).model.layers[0].mlp.up_proj.weight)
