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


BROKEN_TEMPLATES = {  # template -> what the one line must say (jinja's own message included)
    "syntax error": ("{% for m in messages %}{{ m['content'] }", "fails to render (TemplateSyntaxError at line 1: unexpected '}')"),
    "raise_exception": ("{{ raise_exception('Only user and system roles are supported') }}",
                        "fails to render (TemplateError: Only user and system roles are supported)"),
    "undefined variable": ("{% for m in messages %}{{ m['content'] + eos_tokn.upper() }}{% endfor %}",
                           "fails to render (UndefinedError: 'eos_tokn' is undefined)"),
    "empty": ("", "has a blank chat template (empty or whitespace: it renders nothing"),
    "whitespace": ("  \n ", "has a blank chat template (empty or whitespace: it renders nothing"),
}


@pytest.mark.parametrize("case", list(BROKEN_TEMPLATES))
def test_a_broken_chat_template_is_one_line_that_names_it(case, default_model_dir, tmp_path):
    """Not an internal error (exit 1) for a template jinja cannot render, nor "no record keeps a
    loss token" for a blank one: one line naming the template's problem, before any training."""
    template, said = BROKEN_TEMPLATES[case]
    model = with_chat_template(default_model_dir, tmp_path / "model", template)
    r = ftcore_in_process("run", "--backend", "torch", "--model", model, "--prompt-format", "chat",
                          "--out", tmp_path / "out")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert lines[0].startswith("error: --prompt-format chat: ") and str(model) in lines[0] and said in lines[0], lines[0]
    assert lines[0].endswith("use --prompt-format alpaca") and not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def chat_adapter(default_model_dir, tmp_path_factory):
    """A PEFT adapter of the default model recorded as trained with --prompt-format chat."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    base = LlamaForCausalLM.from_pretrained(str(default_model_dir), dtype=torch.float32)
    out = tmp_path_factory.mktemp("chat-adapter") / "adapter"
    get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])).save_pretrained(str(out))
    write_prompt_format(out, "chat")
    return out


@pytest.mark.parametrize("asked", [[], ["--prompt-format", "chat"]])
def test_generate_s_advice_for_a_chat_adapter_on_a_template_less_model_works(asked, chat_adapter, default_model_dir,
                                                                              chat_model_dir):
    """A chat adapter on a model without a chat template: the advice is never --prompt-format
    alpaca (refused for a chat adapter); each way out it names is taken."""
    args = ["generate", "--adapter", chat_adapter, "--prompt", "Spell cat in reverse.", "--max-new-tokens", "2"]
    r = ftcore_in_process(*args, "--model", default_model_dir, *asked)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert lines[0].startswith(f"error: {chat_adapter} was trained with --prompt-format chat, and "
                               f"{default_model_dir} has no chat template"), lines[0]
    assert "--prompt-format alpaca" not in lines[0] and "give the --model it was trained on" in lines[0]
    assert "or --raw" in lines[0]
    assert ftcore_in_process(*args, "--model", default_model_dir, "--raw").returncode == 0
    assert ftcore_in_process(*args, "--model", chat_model_dir, *asked).returncode == 0
