"""GLM-4's chat format as a Jinja chat template, the same one the official glm-4-9b-chat ships.

Format: ``[gMASK]<sop>`` once, then ``<|role|>`` + metadata + ``\\n`` + content per message; the
generation prompt is a bare ``<|assistant|>`` (the model itself writes the newline before its
answer). ``tools`` passed to ``apply_chat_template`` become GLM-4's tool system prompt; an OpenAI
``tool`` message becomes ``<|observation|>``; an assistant ``tool_calls`` entry becomes
``<|assistant|>name\\n{arguments}``, which is how GLM-4 writes a call.

>>> from glmkit.loading import load_tokenizer
>>> tok = load_tokenizer()
>>> tok.apply_chat_template([{"role": "system", "content": "S"}, {"role": "user", "content": "U"}],
...                         tokenize=False, add_generation_prompt=True)
'[gMASK]<sop><|system|>\\nS<|user|>\\nU<|assistant|>'
"""

from __future__ import annotations

# The system prompt GLM-4 was trained with for tool use (kept verbatim, it is part of the format).
GLM4_TOOL_SYSTEM_PROMPT = (
    "你是一个名为 GLM-4 的人工智能助手。你是基于智谱AI训练的语言模型 GLM-4 模型开发的，"
    "你的任务是针对用户的问题和要求提供适当的答复和支持。\n\n# 可用工具"
)
GLM4_TOOL_SUFFIX = "在调用上述函数时，请使用 Json 格式表示调用的参数。"

GLM4_CHAT_TEMPLATE = (
    "{{- '[gMASK]<sop>' -}}"
    "{%- if tools -%}"
    "{{- '<|system|>\\n" + GLM4_TOOL_SYSTEM_PROMPT.replace("\n", "\\n") + "' -}}"
    "{%- for tool in tools -%}"
    "{%- set fn = tool['function'] if tool['function'] is defined else tool -%}"
    "{{- '\\n\\n## ' + fn['name'] + '\\n\\n' + (fn | tojson(indent=4)) + '\\n"
    + GLM4_TOOL_SUFFIX + "' -}}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{%- for m in messages -%}"
    "{%- if m['tool_calls'] is defined and m['tool_calls'] -%}"
    "{%- for call in m['tool_calls'] -%}"
    "{%- set fn = call['function'] if call['function'] is defined else call -%}"
    "{%- set args = fn['arguments'] if fn['arguments'] is string else (fn['arguments'] | tojson) -%}"
    "{{- '<|assistant|>' + fn['name'] + '\\n' + args -}}"
    "{%- endfor -%}"
    "{%- elif m['content'] -%}"
    "{%- set role = 'observation' if m['role'] == 'tool' else m['role'] -%}"
    "{{- '<|' + role + '|>' + (m['metadata'] or '' if m['metadata'] is defined else '') + '\\n'"
    " + m['content'] -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>' -}}{%- endif -%}"
)

# Roles the template understands (``tool`` is OpenAI's name for GLM-4's ``observation``).
GLM4_ROLES = ("system", "user", "assistant", "observation", "tool")
