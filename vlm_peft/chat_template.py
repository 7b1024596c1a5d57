"""Qwen3's chat format, extended with image content parts.

Qwen3's own template renders a non-string `content` as '' (images would vanish), so this one
renders `{"type": "image"}` parts as the `image_placeholder` variable the processor passes in,
and otherwise follows Qwen3: the last assistant turn after the last user query carries a
(possibly empty) think block, earlier ones do not; `enable_thinking=false` ends the generation
prompt with an empty think block; tool results are folded into user turns.
"""

QWEN3_VL_TEMPLATE = r"""
{%- set image_placeholder = image_placeholder | default('<|vision_start|><|image_pad|><|vision_end|>') -%}
{%- macro render(content) -%}
{%- if content is none -%}
{%- elif content is string -%}{{- content -}}
{%- else -%}
{%- for part in content -%}
{%- if part.type in ['image', 'image_url'] -%}{{- image_placeholder -}}
{%- elif part.type == 'text' -%}{{- part.text -}}
{%- else -%}{{- raise_exception('unsupported content part type: ' ~ part.type) -}}
{%- endif -%}
{%- endfor -%}
{%- endif -%}
{%- endmacro -%}
{%- if tools -%}{{- raise_exception('tool definitions are not supported by the vlm-peft chat template') -}}{%- endif -%}
{%- set ns = namespace(last_query_index=messages | length - 1, found=false) -%}
{%- for message in messages[::-1] -%}
{%- set index = (messages | length - 1) - loop.index0 -%}
{%- if not ns.found and message.role == 'user' -%}
{%- set text = render(message.content) -%}
{%- if not (text.startswith('<tool_response>') and text.endswith('</tool_response>')) -%}
{%- set ns.found = true -%}
{%- set ns.last_query_index = index -%}
{%- endif -%}
{%- endif -%}
{%- endfor -%}
{%- for message in messages -%}
{%- set content = render(message.content) -%}
{%- if message.role in ['user', 'system'] -%}
{{- '<|im_start|>' + message.role + '\n' + content + '<|im_end|>\n' -}}
{%- elif message.role == 'assistant' -%}
{%- set reasoning = '' -%}
{%- if message.reasoning_content is string -%}
{%- set reasoning = message.reasoning_content -%}
{%- elif '</think>' in content -%}
{%- set reasoning = content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') -%}
{%- set content = content.split('</think>')[-1].lstrip('\n') -%}
{%- endif -%}
{%- if loop.index0 > ns.last_query_index and (loop.last or reasoning) -%}
{{- '<|im_start|>assistant\n<think>\n' + reasoning.strip('\n') + '\n</think>\n\n' + content.lstrip('\n') -}}
{%- else -%}
{{- '<|im_start|>assistant\n' + content -}}
{%- endif -%}
{{- '<|im_end|>\n' -}}
{%- elif message.role == 'tool' -%}
{%- if loop.first or messages[loop.index0 - 1].role != 'tool' -%}{{- '<|im_start|>user' -}}{%- endif -%}
{{- '\n<tool_response>\n' + content + '\n</tool_response>' -}}
{%- if loop.last or messages[loop.index0 + 1].role != 'tool' -%}{{- '<|im_end|>\n' -}}{%- endif -%}
{%- else -%}
{{- raise_exception('unknown message role: ' ~ message.role) -}}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
{{- '<|im_start|>assistant\n' -}}
{%- if enable_thinking is defined and enable_thinking is false -%}{{- '<think>\n\n</think>\n\n' -}}{%- endif -%}
{%- endif -%}
""".strip()
