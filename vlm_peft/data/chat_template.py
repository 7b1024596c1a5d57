"""Qwen3's chat format, extended with image content parts and assistant-mask markers.

Qwen3's own template renders a non-string `content` as '' (images would vanish, and a user
turn holding an image would not count as the last query). This one renders `{"type": "image"}`
parts as the `image_placeholder` variable the processor passes in (the collapsed one-pad slot
otherwise, which the processor expands) and keeps everything else of Qwen3: tool definitions and
calls, tool results folded into user turns, a (possibly empty) think block on assistant turns
after the last user query, `enable_thinking=false` ending the generation prompt with an empty
think block. `{% generation %}` marks what the assistant produces: its answer and `<|im_end|>`,
plus the reasoning when there is some; an empty think block belongs to the prompt.
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
{%- if tools -%}
{{- '<|im_start|>system\n' -}}
{%- if messages[0].role == 'system' -%}{{- render(messages[0].content) + '\n\n' -}}{%- endif -%}
{{- "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" -}}
{%- for tool in tools -%}{{- "\n" -}}{{- tool | tojson -}}{%- endfor -%}
{{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" -}}
{%- elif messages[0].role == 'system' -%}
{{- '<|im_start|>system\n' + render(messages[0].content) + '<|im_end|>\n' -}}
{%- endif -%}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages | length - 1) -%}
{%- for message in messages[::-1] -%}
{%- set index = (messages | length - 1) - loop.index0 -%}
{%- if ns.multi_step_tool and message.role == 'user' -%}
{%- set text = render(message.content) -%}
{%- if not (text.startswith('<tool_response>') and text.endswith('</tool_response>')) -%}
{%- set ns.multi_step_tool = false -%}
{%- set ns.last_query_index = index -%}
{%- endif -%}
{%- endif -%}
{%- endfor -%}
{%- for message in messages -%}
{%- set content = render(message.content) -%}
{%- if message.role == 'user' or (message.role == 'system' and not loop.first) -%}
{{- '<|im_start|>' + message.role + '\n' + content + '<|im_end|>\n' -}}
{%- elif message.role == 'assistant' -%}
{%- set reasoning = '' -%}
{%- if message.reasoning_content is string -%}
{%- set reasoning = message.reasoning_content -%}
{%- elif '</think>' in content -%}
{%- set reasoning = content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') -%}
{%- set content = content.split('</think>')[-1].lstrip('\n') -%}
{%- endif -%}
{{- '<|im_start|>assistant\n' -}}
{%- set shown = content -%}
{%- if loop.index0 > ns.last_query_index and (loop.last or reasoning) -%}
{%- if reasoning.strip('\n') -%}
{%- generation -%}{{- '<think>\n' + reasoning.strip('\n') + '\n</think>\n\n' -}}{%- endgeneration -%}
{%- else -%}
{{- '<think>\n\n</think>\n\n' -}}
{%- endif -%}
{%- set shown = content.lstrip('\n') -%}
{%- endif -%}
{%- generation -%}
{{- shown -}}
{%- if message.tool_calls -%}
{%- for tool_call in message.tool_calls -%}
{#- As Qwen3's template: the newline test reads the content before its leading newlines are stripped. -#}
{%- if (loop.first and content) or (not loop.first) -%}{{- '\n' -}}{%- endif -%}
{%- if tool_call.function -%}{%- set tool_call = tool_call.function -%}{%- endif -%}
{{- '<tool_call>\n{"name": "' + tool_call.name + '", "arguments": ' -}}
{%- if tool_call.arguments is string -%}{{- tool_call.arguments -}}{%- else -%}{{- tool_call.arguments | tojson -}}{%- endif -%}
{{- '}\n</tool_call>' -}}
{%- endfor -%}
{%- endif -%}
{{- '<|im_end|>' -}}
{%- endgeneration -%}
{{- '\n' -}}
{%- elif message.role == 'tool' -%}
{%- if loop.first or messages[loop.index0 - 1].role != 'tool' -%}{{- '<|im_start|>user' -}}{%- endif -%}
{{- '\n<tool_response>\n' + content + '\n</tool_response>' -}}
{%- if loop.last or messages[loop.index0 + 1].role != 'tool' -%}{{- '<|im_end|>\n' -}}{%- endif -%}
{%- elif not (message.role == 'system' and loop.first) -%}
{{- raise_exception('unknown message role: ' ~ message.role) -}}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
{{- '<|im_start|>assistant\n' -}}
{%- if enable_thinking is defined and enable_thinking is false -%}{{- '<think>\n\n</think>\n\n' -}}{%- endif -%}
{%- endif -%}
""".strip()
