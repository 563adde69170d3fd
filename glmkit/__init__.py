"""glmkit: run GLM-4-9B-Chat on one or several GPUs, step by step, from JupyterLab.

Modules (each stands on its own, so single helpers can be copied into other projects):
``models`` presets and the tiny checkpoint, ``loading`` model/tokenizer loaders, ``env``
machine report and the notebooks' setup cell, ``chat_template`` GLM-4's chat format.
"""

__version__ = "0.1.0"
