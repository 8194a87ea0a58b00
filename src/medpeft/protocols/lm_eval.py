"""lm-evaluation-harness's zero-shot multiple-choice tasks, as the Open Medical-LLM Leaderboard
runs them (mirrors lm-eval 0.4.13: ``lm_eval/tasks/{medqa,medmcqa,pubmedqa,mmlu/default,cmmlu}``
and ``lm_eval/api/task.py``; tests/test_protocols.py runs lm-eval itself and checks that every
item's prediction and the accuracy are the same).

* Prompts: ``medqa_4options``: ``Question: {q}\\nA. {a}\\n...D. {d}\\nAnswer:``; ``medmcqa``:
  ``Question: {q}\\nChoices:\\nA. ...\\nAnswer:`` (lm-eval scores its validation split as test);
  ``pubmedqa``: ``Abstract: {sections joined by newlines}\\nQuestion: {q}\\nAnswer:`` with the
  words yes / no / maybe as the choices; ``mmlu_<subject>`` and ``cmmlu_<subject>``: the task's
  description line, then the stem, the options and ``Answer:`` / ``答案：``.
* Choices are scored as continuations with the target delimiter (a leading space) unless the
  chat template is applied (``eval.apply_chat_template``, lm-eval's ``--apply_chat_template``):
  then the description is the system turn, the prompt the user turn, and the delimiter empty.
* Tokenization is lm-eval's ``_encode_pair``: the tokenizer's own special tokens (its BOS where
  it adds one), ``context + continuation`` encoded whole, the continuation being the tokens
  after the context's own encoding; contexts beyond the model's length are left-truncated.
* ``acc``: the argmax of the summed log-likelihoods; ``acc_norm``: of the log-likelihoods
  divided by each choice's length in characters.
"""

from __future__ import annotations

from ..data.record import QARecord
from . import ChoiceRequest, LoglikelihoodProtocol

LETTERS = "ABCD"
PUBMEDQA_CHOICES = ["yes", "no", "maybe"]

# CMMLU subjects' names in lm-eval's task descriptions (lm_eval/tasks/cmmlu/_generate_configs.py)
CMMLU_SUBJECTS = {
    "agronomy": "农学", "anatomy": "解剖学", "ancient_chinese": "古汉语", "arts": "艺术学", "astronomy": "天文学",
    "business_ethics": "商业伦理", "chinese_civil_service_exam": "中国公务员考试", "chinese_driving_rule": "中国驾驶规则",
    "chinese_food_culture": "中国饮食文化", "chinese_foreign_policy": "中国外交政策", "chinese_history": "中国历史",
    "chinese_literature": "中国文学", "chinese_teacher_qualification": "中国教师资格", "clinical_knowledge": "临床知识",
    "college_actuarial_science": "大学精算学", "college_education": "大学教育学",
    "college_engineering_hydrology": "大学工程水文学", "college_law": "大学法律", "college_mathematics": "大学数学",
    "college_medical_statistics": "大学医学统计", "college_medicine": "大学医学", "computer_science": "计算机科学",
    "computer_security": "计算机安全", "conceptual_physics": "概念物理学",
    "construction_project_management": "建设工程管理", "economics": "经济学", "education": "教育学",
    "electrical_engineering": "电气工程", "elementary_chinese": "小学语文", "elementary_commonsense": "小学常识",
    "elementary_information_and_technology": "小学信息技术", "elementary_mathematics": "初等数学", "ethnology": "民族学",
    "food_science": "食品科学", "genetics": "遗传学", "global_facts": "全球事实", "high_school_biology": "高中生物",
    "high_school_chemistry": "高中化学", "high_school_geography": "高中地理", "high_school_mathematics": "高中数学",
    "high_school_physics": "高中物理学", "high_school_politics": "高中政治", "human_sexuality": "人类性行为",
    "international_law": "国际法学", "journalism": "新闻学", "jurisprudence": "法理学",
    "legal_and_moral_basis": "法律与道德基础", "logical": "逻辑学", "machine_learning": "机器学习", "management": "管理学",
    "marketing": "市场营销", "marxist_theory": "马克思主义理论", "modern_chinese": "现代汉语", "nutrition": "营养学",
    "philosophy": "哲学", "professional_accounting": "专业会计", "professional_law": "专业法学",
    "professional_medicine": "专业医学", "professional_psychology": "专业心理学", "public_relations": "公共关系",
    "security_study": "安全研究", "sociology": "社会学", "sports_science": "体育学",
    "traditional_chinese_medicine": "中医中药", "virology": "病毒学", "world_history": "世界历史", "world_religions": "世界宗教",
}


def _texts(record: QARecord) -> tuple[str, dict[str, str]]:
    """Stem and options as the release wrote them (lm-eval reads the raw fields)."""
    raw = record.metadata.get("verbatim") or {}
    raw_options = raw.get("options") or {}
    options = {k: str(raw_options[k]) if raw_options.get(k) is not None else v for k, v in record.options.items()}
    question = raw.get("question") if isinstance(raw.get("question"), str) else record.question
    return question, options


class LmEvalHarness(LoglikelihoodProtocol):
    name = "lm-eval"
    source = "lm-evaluation-harness 0.4.13, lm_eval/tasks/{medqa,medmcqa,pubmedqa,mmlu/default,cmmlu}"

    def task(self, record: QARecord) -> str | None:
        if record.question_type != "single" or list(record.options) != list(
                "ABC" if record.benchmark == "pubmedqa" else LETTERS):
            return None
        if record.benchmark == "medqa":
            return "medqa_4options"
        if record.benchmark in ("medmcqa", "pubmedqa"):
            return record.benchmark
        subject = record.metadata.get("subject")
        if record.benchmark == "mmlu" and subject:
            return f"mmlu_{subject}"
        if record.benchmark == "cmmlu" and subject in CMMLU_SUBJECTS:
            return f"cmmlu_{subject}"
        return None

    def order_dependent_for(self, record: QARecord) -> bool:
        return record.benchmark != "pubmedqa"  # its prompt shows no options: the choices are the words

    def description_and_text(self, record: QARecord) -> tuple[str, str]:
        """The task's description (empty for most) and ``doc_to_text`` of the record."""
        question, options = _texts(record)
        if record.benchmark == "medqa":
            return "", f"Question: {question}\n" + "".join(f"{k}. {options[k]}\n" for k in LETTERS) + "Answer:"
        if record.benchmark == "medmcqa":
            return "", "Question: " + question + "\nChoices:\n" + "".join(f"{k}. {options[k]}\n" for k in LETTERS) \
                + "Answer:"
        if record.benchmark == "pubmedqa":
            raw = record.metadata["verbatim"]
            return "", "Abstract: {}\nQuestion: {}\nAnswer:".format("\n".join(raw["contexts"]), raw["question"])
        subject = record.metadata["subject"]
        body = f"{question.strip()}\n" + "".join(f"{k}. {options[k]}\n" for k in LETTERS)
        if record.benchmark == "mmlu":
            return (f"The following are multiple choice questions (with answers) about {' '.join(subject.split('_'))}."
                    "\n\n", body + "Answer:")
        return f"以下是关于{CMMLU_SUBJECTS[subject]}的单项选择题，请直接给出正确答案的选项。\n\n", body + "答案："

    def request(self, record: QARecord, tokenizer, apply_chat_template: bool) -> ChoiceRequest:
        description, text = self.description_and_text(record)
        choices = PUBMEDQA_CHOICES if record.benchmark == "pubmedqa" else list(LETTERS)
        if apply_chat_template:
            messages = ([{"role": "system", "content": description}] if description else []) + \
                [{"role": "user", "content": text}]
            context = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            delimiter = ""  # lm-eval drops the target delimiter under a chat template
        else:
            context, delimiter = description + text, " "
        labels = list(record.options)  # pubmedqa's yes/no/maybe are options A/B/C of the record
        return ChoiceRequest(context, [delimiter + c for c in choices], labels, [len(c) for c in choices])


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's ``_encode_pair`` for a causal model (``lm_eval/api/model.py``): trailing spaces
    of the context move to the continuation; the pair is encoded whole and split after the
    context's own encoding. Special tokens as the tokenizer adds them by default, unless the
    text already starts with its BOS (``HFLM.tok_encode``)."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    prefix_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    bos_text = tokenizer.decode(prefix_id) if prefix_id is not None else None

    def encode(text: str) -> list[int]:
        if bos_text is not None and text.startswith(bos_text):
            return tokenizer.encode(text, add_special_tokens=False)
        return tokenizer.encode(text)

    whole, ctx = encode(context + continuation), encode(context)
    return ctx, whole[len(ctx):]


def max_length(model, tokenizer, default: int = 2048) -> int:
    """The context length lm-eval's HF model uses (``resolve_max_length``): the config's
    ``n_positions`` / ``max_position_embeddings`` / ``n_ctx``, else the tokenizer's limit."""
    config = getattr(model.config, "text_config", None) or model.config
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(config, attr, None)
        if value is not None:
            return int(value)
    limit = getattr(tokenizer, "model_max_length", None)
    return int(limit) if limit is not None and limit != int(1e30) else default
