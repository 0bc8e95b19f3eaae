"""align: LLM alignment and RLHF on one shared base model.

Importing `align` is cheap: it imports neither Ray nor vLLM (nor torch); each subpackage loads
what it needs when it is used.
"""

__version__ = "0.1.0"
