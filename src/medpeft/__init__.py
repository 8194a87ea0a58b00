"""medpeft: parameter-efficient fine-tuning of LLMs on medical multiple-choice QA.

Pipeline (each a module, imports flow one way):
data -> tags -> prompts -> models/adapters -> train -> evaluate -> stats -> report.
"""

__version__ = "0.1.0"
