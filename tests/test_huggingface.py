"""A Hugging Face GPT-2 (random init of a tiny config: nothing downloaded) grown through the
Python API on the `text` task's tokens: tuple outputs need a selector, `ModelOutput`s an `output`
function. Skipped when `transformers` is absent (`pip install 'esper[hf]'`; CI installs it)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from torch import nn

import esper
from esper.contracts.errors import ConfigError
from esper.kasmina import InsertionError, insert_slots, slots_of
from esper.tolaria.data import load_task

# ---------------------------------------------------------------------------------------------

transformers = pytest.importorskip(
    "transformers", reason="Hugging Face transformers is not installed (pip install 'esper[hf]')"
)
logging.getLogger("transformers").setLevel(logging.ERROR)


def gpt2() -> nn.Module:
    config = transformers.GPT2Config(
        vocab_size=256,
        n_positions=64,
        n_embd=16,
        n_layer=2,
        n_head=2,
        use_cache=False,
        bos_token_id=0,
        eos_token_id=0,
    )
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config)


TOKENS = torch.zeros(2, 64, dtype=torch.long)


def test_a_gpt2_attention_needs_a_selector_and_gets_one() -> None:
    model = gpt2().eval()  # no dropout: outputs compare exactly
    x = torch.randint(0, 256, (3, 64), generator=torch.Generator().manual_seed(1))
    logits = model(x).logits
    with pytest.raises(InsertionError) as e:  # before: AttributeError: 'tuple' ... 'dim'
        insert_slots(model, ["transformer.h.1.attn"], TOKENS)
    msg = str(e.value)
    assert "tuple(0: Tensor(2, 64, 16)" in msg and "'transformer.h.1.attn.c_proj'" in msg
    slots = insert_slots(
        model,
        ["transformer.h.0.mlp", "transformer.h.1.attn"],
        TOKENS,
        select={"transformer.h.1.attn": 0},
    )
    assert {(s.topology.value, s.channels) for s in slots.values()} == {("seq", 16)}
    assert torch.equal(model(x).logits, logits)  # dormant slots change nothing


def test_a_model_returning_an_output_object_needs_output() -> None:
    model = gpt2()
    insert_slots(model, ["transformer.h.0.mlp"], TOKENS)
    with pytest.raises(ConfigError, match=r"output=lambda out: out\.logits"):
        esper.grow(model, task="text", ticks=1)


def test_a_gpt2_grows_on_the_text_tasks_tokens(tmp_path: Path) -> None:
    model = gpt2()
    insert_slots(
        model,
        ["transformer.h.0.mlp", "transformer.h.1.attn"],
        TOKENS,
        select={"transformer.h.1.attn": 0},
    )
    text = load_task("text", text_bytes=60_000)
    grown, result = esper.grow(
        model,
        (text.train_x, text.train_y),
        (text.val_x, text.val_y),
        output=lambda out: out.logits,
        ticks=4,
        run_dir=tmp_path / "gpt2",
        **{
            "env.batches_per_tick": 2,
            "env.eval_samples": 64,
            "heuristic.warmup_ticks": 0,
            "heuristic.plateau_delta": 10.0,
        },
    )
    assert grown is model and result.metric_name == "bits_per_token"
    assert result.germinated and result.params_end > result.params_start
    assert result.final_metric < result.start_metric  # 8 bits/byte at random; it learns
    stages = {s.name: s.stage.name for s in slots_of(model).values()}
    assert "TRAINING" in stages.values() or "BLENDING" in stages.values(), stages
