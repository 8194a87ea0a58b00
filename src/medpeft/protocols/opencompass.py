"""OpenCompass's CMB generation protocol (mirrors OpenCompass 0.5.4:
``opencompass/configs/datasets/cmb/cmb_gen_dfb5c4.py``, ``opencompass/datasets/cmb.py`` and
``multiple_select_postprocess`` in ``opencompass/utils/text_postprocessors.py``).

* Prompt (the HUMAN turn, through the chat template when the tokenizer has one):
  ``以下是中国{exam_type}中{exam_class}考试的一道{question_type}，不需要做任何分析和解释，直接输出答案选项。\\n{question}\\n{option_str} \\n 答案: ``
  where ``option_str`` joins ``{letter}. {text}`` of the options whose text is longer than one
  character (CMBDataset's ``len(v) > 1``: a one-character option is left out of the prompt).
* Greedy generation of at most 10 new tokens (``max_out_len=10``).
* Post-processing: the sorted set of every upper-case character of the output
  (``multiple_select_postprocess``), compared with the gold letters as a string
  (``AccEvaluator``). An output with no upper-case character is an extraction failure.
  The rule reads any capital, not only option letters: ``"The answer is B"`` becomes ``"BT"``
  and is scored wrong, as OpenCompass scores it.
"""

from __future__ import annotations

from ..data.record import MULTI, QARecord
from . import GenerationProtocol, chat_or_plain

QUESTION_TYPE = {"single": "单项选择题", MULTI: "多项选择题"}
MAX_OUT_LEN = 10


def option_str(options: dict[str, str]) -> str:
    return "\n".join(f"{k}. {v}" for k, v in options.items() if len(v) > 1)


def multiple_select_postprocess(text: str) -> str:
    """OpenCompass's rule: the sorted set of the upper-case characters of ``text``."""
    return "".join(sorted({t for t in text if t.isupper()}))


class OpenCompassCMB(GenerationProtocol):
    name = "opencompass-cmb"
    source = "OpenCompass 0.5.4, configs/datasets/cmb/cmb_gen_dfb5c4.py + multiple_select_postprocess"
    def task(self, record: QARecord) -> str | None:
        md = record.metadata
        if record.benchmark != "cmb" or record.question_type not in QUESTION_TYPE or not md.get("exam_type") \
                or not md.get("exam_class"):
            return None  # the converted CMB rows carry no exam type/class: the prompt cannot be built
        return "cmb"

    def max_new_tokens(self, cfg) -> int:
        return MAX_OUT_LEN

    def prompt(self, record: QARecord, tokenizer) -> str:
        md = record.metadata
        human = (f"以下是中国{md['exam_type']}中{md['exam_class']}考试的一道{QUESTION_TYPE[record.question_type]}，"
                 f"不需要做任何分析和解释，直接输出答案选项。\n{record.question}\n{option_str(record.options)} \n 答案: ")
        return chat_or_plain(tokenizer, human)

    def parse(self, text: str, record: QARecord) -> str | None:
        """The post-processed string (which may hold letters that are no option); None when empty."""
        return multiple_select_postprocess(text) or None
