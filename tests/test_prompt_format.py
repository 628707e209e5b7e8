"""--prompt-format chat: records rendered with the model's own chat template, exactly as
`tokenizer.apply_chat_template` renders them (the ids every backend, mlx-lm included, trains on),
loss on the assistant turn only, refused for a model without a template, and recorded in the
adapter folder so `ftcore generate` asks in the same format."""

from __future__ import annotations

import json

import pytest
from helpers import ftcore_in_process, with_chat_template

from ftcore.config import RunConfig, UserError
from ftcore.inputs.batches import build_batches
from ftcore.inputs.loss_contract import IGNORE_INDEX
from ftcore.inputs.records import PROMPT_FORMAT_FILE, chat_messages, write_prompt_format
from ftcore.inputs.token_rows import tokenize_records
from ftcore.inputs.tokenizer import load_tokenizer
from ftcore.run.generate_text import prompt_ids, resolve_prompt_format

pytestmark = pytest.mark.unit

RECORD = {"instruction": "Spell the word in reverse.", "input": "cat", "output": "tac"}


@pytest.fixture(scope="module")
def chat_model_dir(default_model_dir, tmp_path_factory):
    return with_chat_template(default_model_dir, tmp_path_factory.mktemp("chat") / "model")


@pytest.fixture(scope="module")
def chat_tok(chat_model_dir):
    return load_tokenizer(chat_model_dir)


def test_chat_ids_are_apply_chat_template_s(chat_tok):
    tok = tokenize_records([RECORD], chat_tok, 512, mask_prompt=True, prompt_format="chat")
    messages = [{"role": "user", "content": "Spell the word in reverse.\n\ncat"}, {"role": "assistant", "content": "tac"}]
    assert chat_messages(RECORD) == messages
    assert tok.ids[0] == list(chat_tok.apply_chat_template(messages, tokenize=True)["input_ids"])
    prompt = list(chat_tok.apply_chat_template(messages[:1], add_generation_prompt=True, tokenize=True)["input_ids"])
    assert tok.prompt_lens == [len(prompt)] and tok.ids[0][: len(prompt)] == prompt
    labels = tok.labels[0]
    assert labels[: len(prompt)] == [IGNORE_INDEX] * len(prompt)  # loss on the assistant turn only
    assert chat_tok.decode(labels[len(prompt) :], skip_special_tokens=True).strip() == "tac"


def test_chat_batches_answer_with_the_assistant_text_and_eos(chat_tok):
    cfg = RunConfig(num_samples=8, eval_samples=4, batch_size=2, steps=2, prompt_format="chat")
    chat, alpaca = build_batches(cfg, chat_tok), build_batches(cfg.replace(prompt_format="alpaca"), chat_tok)
    assert chat.fingerprint != alpaca.fingerprint
    for (p, answer), (_, alpaca_answer) in zip(chat.answer_items(), alpaca.answer_items(), strict=True):
        # the same record's output text in both formats, ending at the template's EOS
        assert chat_tok.decode(answer, skip_special_tokens=True).strip() == \
            chat_tok.decode(alpaca_answer, skip_special_tokens=True).strip() != ""
        assert answer[-1] == chat_tok.eos_token_id and answer.count(chat_tok.eos_token_id) == 1
        assert chat_tok.decode(p).endswith("<|assistant|>\n")


def test_a_model_without_a_chat_template_refuses_chat(default_model_dir, tmp_path):
    r = ftcore_in_process("run", "--backend", "torch", "--model", default_model_dir, "--prompt-format", "chat",
                          "--out", tmp_path / "out")
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith(f"error: --prompt-format chat: {default_model_dir} has no chat template"), r.stderr
    assert not (tmp_path / "out").exists()


def test_generate_asks_in_the_adapter_s_format(chat_tok, tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    assert resolve_prompt_format(adapter, None) == "alpaca"  # no record: another tool's adapter
    write_prompt_format(adapter, "chat")
    assert json.loads((adapter / PROMPT_FORMAT_FILE).read_text()) == {"prompt_format": "chat"}
    assert resolve_prompt_format(adapter, None) == resolve_prompt_format(adapter, "chat") == "chat"
    with pytest.raises(UserError, match="trained with --prompt-format chat"):
        resolve_prompt_format(adapter, "alpaca")
    ids = prompt_ids(chat_tok, "Spell the word in reverse.", "cat", raw=False, prompt_format="chat")
    assert ids == tokenize_records([RECORD], chat_tok, 512, True, "chat").ids[0][: len(ids)]
    assert len(ids) == tokenize_records([RECORD], chat_tok, 512, True, "chat").prompt_lens[0]
