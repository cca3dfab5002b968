"""Chat templates: rendering like transformers, errors that name the message, the sandbox, end markers."""

import pytest

from slmkit.align.chat import (ChatTemplateError, assistant_end_marker, chat_template_of, cut_after_first_special,
                               render_chat)
from slmkit.data.tokenizer import CHAT_TEMPLATE

CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>' + '\\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
CONVO = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
         {"role": "assistant", "content": "4"}]


def test_renders_slmkit_template():
    assert render_chat(CHAT_TEMPLATE, CONVO) == ("<|system|>\nBe brief.<|end|>\n<|user|>\n2+2?<|end|>\n"
                                                 "<|assistant|>\n4<|end|>\n")
    assert render_chat(CHAT_TEMPLATE, CONVO[:2], add_generation_prompt=True).endswith("<|end|>\n<|assistant|>\n")


def test_matches_transformers_apply_chat_template():
    transformers = pytest.importorskip("transformers")
    from slmkit.data.tokenizer import SPECIAL_TOKENS, train_tokenizer

    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=train_tokenizer(["hello world"] * 10, vocab_size=300),
                                               chat_template=CHAT_TEMPLATE, bos_token=SPECIAL_TOKENS[1])
    for template in (CHAT_TEMPLATE, CHATML):
        for gen in (False, True):
            ref = tok.apply_chat_template(CONVO, chat_template=template, tokenize=False, add_generation_prompt=gen)
            assert render_chat(template, CONVO, add_generation_prompt=gen) == ref


def test_error_names_the_message_and_the_templates_reason():
    bad = CONVO + [{"role": "tool", "content": "{}"}, {"role": "user", "content": "ok"}]
    with pytest.raises(ChatTemplateError, match=r"message 3 \(role 'tool'\): role must be system, user or assistant"):
        render_chat(CHAT_TEMPLATE, bad)


def test_error_from_a_template_bug_names_the_message():
    template = "{% for m in messages %}{{ m['content'] + m['name'] }}{% endfor %}"  # 'name' only on some messages
    messages = [{"role": "user", "content": "a", "name": "x"}, {"role": "assistant", "content": "b"}]
    with pytest.raises(ChatTemplateError, match=r"message 1 \(role 'assistant'\)"):
        render_chat(template, messages)


@pytest.mark.parametrize("messages, match", [
    ([], "non-empty list"),
    ([{"role": "user"}], r"message 0 \(role 'user'\) has no string 'content'"),
    ([{"content": "x"}], "message 0 has no string 'role'"),
    (["hi"], "message 0 is a str"),
])
def test_bad_message_shapes(messages, match):
    with pytest.raises(ChatTemplateError, match=match):
        render_chat(CHAT_TEMPLATE, messages)


def test_syntax_error_names_the_template_line():
    with pytest.raises(ChatTemplateError, match="does not compile: line 2"):
        render_chat("{% for m in messages %}\n{{ m['content'] }\n{% endfor %}", CONVO)


def test_sandbox_refuses_mutation_and_python_internals():
    with pytest.raises(ChatTemplateError, match="message 0"):
        render_chat("{% for m in messages %}{{ messages.append(m) }}{% endfor %}", CONVO)
    with pytest.raises(ChatTemplateError):
        render_chat("{{ messages.__class__.__mro__ }}", CONVO)


def test_tojson_keeps_unicode():
    assert render_chat("{{ messages[0]['content'] | tojson }}", [{"role": "user", "content": "café"}]) == '"café"'


def test_template_from_config_and_errors(tmp_path):
    assert chat_template_of({"chat_template": [{"name": "tool_use", "template": "x"},
                                               {"name": "default", "template": "y"}]})[0] == "y"
    template, variables = chat_template_of({"chat_template": "t", "bos_token": {"content": "<s>"}, "eos_token": "</s>"})
    assert template == "t" and variables == {"bos_token": "<s>", "eos_token": "</s>"}
    with pytest.raises(ChatTemplateError, match="no 'chat_template'"):
        chat_template_of({"bos_token": "<s>"})
    with pytest.raises(ChatTemplateError, match="no tokenizer_config.json"):
        chat_template_of(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("{oops")
    with pytest.raises(ChatTemplateError, match="not valid JSON"):
        chat_template_of(tmp_path)


def test_end_markers():
    assert assistant_end_marker(CHAT_TEMPLATE, ["<|end|>", "<|user|>"]) == "<|end|>"
    assert assistant_end_marker(CHATML, ["<|im_start|>", "<|im_end|>"]) == "<|im_end|>"
    assert assistant_end_marker(CHATML, []) == ""  # no special token written after the content
    assert cut_after_first_special("\n</s><s>", ["<s>", "</s>"]) == "\n</s>"
