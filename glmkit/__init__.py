"""glmkit: run GLM-4-9B-Chat on one or several GPUs, step by step, from JupyterLab.

One flat module per concept; each stands on its own so single helpers can be copied into other projects:
``models`` presets and the tiny checkpoints, ``loading`` loaders with clear errors, ``planning`` the memory
planner, ``device_map`` manual / KV-aware maps and checks, ``monitor`` snapshots, peaks, OOM explanations and
the live widget, ``generation`` chat turns, streaming and chunked prefill, ``fast_decode`` the static-cache
CUDA-graph decoder (one device or a layer split), ``quantization`` precision comparisons, ``engine`` and ``server`` the batching
OpenAI-compatible server, ``widgets`` the chat and the decode tuner, ``parallel`` tensor parallelism,
``bench`` measurements, ``env`` the machine report and the notebooks' setup cell, ``chat_template`` GLM-4's
chat format, ``corpus`` the kit's own training text, ``tables`` table rendering.
"""

__version__ = "0.1.0"
