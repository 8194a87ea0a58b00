"""Clinical axes: a specialty/profession tag and a clinical-operation tag per question.

Tags come from public *non-answer* metadata first (CMB exam type/class, CMExam
discipline/department, MedMCQA subject, MMLU/CMMLU subject), then from deterministic
keyword rules in Chinese and English over the stem and the options. The gold answer is
never read (the tagger only sees ``question``, ``options`` and ``metadata``). Every tag
carries ``why``: the metadata field or the keyword rule that fired.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .data.record import QARecord

if TYPE_CHECKING:
    from .tagger import TextTagger

SPECIALTIES = (
    "clinical_medicine", "pharmacy", "nursing", "public_health",
    "medical_technology", "tcm", "basic_biomedicine", "unknown",
)
OPERATIONS = (
    "diagnosis", "treatment", "medication", "test_interpretation",
    "mechanism", "nursing_action", "public_health", "knowledge_recall", "unknown",
)
UNKNOWN = "unknown"

# Layout of a learned table with one row per tag value of each axis and per pair (a
# routed adapter's clinical gate): specialty rows, then operation rows, then pair rows.
N_SPECIALTY, N_OPERATION = len(SPECIALTIES), len(OPERATIONS)
N_TAG_ROWS = N_SPECIALTY + N_OPERATION + N_SPECIALTY * N_OPERATION


def tag_table_rows(specialty, operation):
    """The three rows a question reads, ``[s, N_S + o, N_S + N_O + N_O s + o]``: ``[B, 3]``
    from the specialty and operation id tensors ``[B]``."""
    import torch

    return torch.stack([specialty, N_SPECIALTY + operation,
                        N_SPECIALTY + N_OPERATION + specialty * N_OPERATION + operation], dim=-1)


@dataclass(frozen=True)
class Tags:
    specialty: str
    operation: str
    why_specialty: str
    why_operation: str

    @property
    def specialty_id(self) -> int:
        return SPECIALTIES.index(self.specialty)

    @property
    def operation_id(self) -> int:
        return OPERATIONS.index(self.operation)

    def to_json(self, record_id: str) -> dict:
        return {"id": record_id, "specialty": self.specialty, "operation": self.operation,
                "why": {"specialty": self.why_specialty, "operation": self.why_operation}}


# ----------------------------------------------------------------------------- metadata maps
# Exact values of the releases' non-answer fields. Ordered (substring, tag) lists are used
# where a value embeds the signal (e.g. CMB "执业中药师" is a pharmacy profession).

CMB_EXAM_TYPE = {"医师考试": "clinical_medicine", "护理考试": "nursing", "药师考试": "pharmacy",
                 "医技考试": "medical_technology"}
CMB_EXAM_CLASS = {
    "基础医学": "basic_biomedicine", "临床医学": "clinical_medicine", "预防医学与公共卫生学": "public_health",
    "中医学与中药学": "tcm", "护理学": "nursing", "西医综合": "clinical_medicine", "中医综合": "tcm",
}
CMB_SUBJECT_HINTS = (("中医", "tcm"), ("中西医", "tcm"), ("针灸", "tcm"), ("公共卫生", "public_health"),
                     ("预防", "public_health"))

MEDMCQA_SUBJECT = {
    "Anatomy": "basic_biomedicine", "Physiology": "basic_biomedicine", "Biochemistry": "basic_biomedicine",
    "Pathology": "basic_biomedicine", "Microbiology": "basic_biomedicine", "Forensic Medicine": "basic_biomedicine",
    "Pharmacology": "pharmacy", "Social & Preventive Medicine": "public_health", "Radiology": "medical_technology",
    "Medicine": "clinical_medicine", "Surgery": "clinical_medicine", "Pediatrics": "clinical_medicine",
    "Gynaecology & Obstetrics": "clinical_medicine", "Ophthalmology": "clinical_medicine", "ENT": "clinical_medicine",
    "Dental": "clinical_medicine", "Orthopaedics": "clinical_medicine", "Psychiatry": "clinical_medicine",
    "Anaesthesia": "clinical_medicine", "Skin": "clinical_medicine",
}
# MMLU and CMMLU share subject names for the medical subsets.
SUBJECT = {
    "anatomy": "basic_biomedicine", "college_biology": "basic_biomedicine", "medical_genetics": "basic_biomedicine",
    "genetics": "basic_biomedicine", "virology": "basic_biomedicine", "high_school_biology": "basic_biomedicine",
    "clinical_knowledge": "clinical_medicine", "college_medicine": "clinical_medicine",
    "professional_medicine": "clinical_medicine", "nutrition": "public_health",
    "college_medical_statistics": "public_health", "traditional_chinese_medicine": "tcm",
}
CMEXAM_DISCIPLINE_HINTS = (("中医", "tcm"), ("中药", "tcm"), ("药", "pharmacy"), ("护理", "nursing"),
                           ("公共卫生", "public_health"), ("预防", "public_health"), ("医学技术", "medical_technology"),
                           ("检验", "medical_technology"), ("影像", "medical_technology"), ("基础医学", "basic_biomedicine"),
                           ("临床", "clinical_medicine"), ("口腔", "clinical_medicine"))
CMEXAM_COMPETENCY_HINTS = (("诊断", "diagnosis"), ("治疗", "treatment"), ("用药", "medication"), ("药", "medication"),
                           ("检查", "test_interpretation"), ("机制", "mechanism"), ("护理", "nursing_action"),
                           ("预防", "public_health"), ("公共卫生", "public_health"), ("知识", "knowledge_recall"))


def _hint(value: str, hints: tuple[tuple[str, str], ...]) -> str | None:
    return next((tag for needle, tag in hints if needle in value), None)


def specialty_from_metadata(rec: QARecord) -> tuple[str, str] | None:
    md = rec.metadata
    if rec.benchmark == "cmb" or "exam_type" in md:
        cls, typ, subj = str(md.get("exam_class", "")), str(md.get("exam_type", "")), str(md.get("exam_subject", ""))
        if cls in CMB_EXAM_CLASS:
            return CMB_EXAM_CLASS[cls], f"metadata:exam_class={cls}"
        if typ == "药师考试":  # 执业中药师, 初级中药士 ... are pharmacy professions, Chinese or Western
            return "pharmacy", f"metadata:exam_type={typ}"
        if typ == "医师考试" and _hint(subj, CMB_SUBJECT_HINTS):
            return _hint(subj, CMB_SUBJECT_HINTS), f"metadata:exam_subject={subj}"
        if typ in CMB_EXAM_TYPE:
            return CMB_EXAM_TYPE[typ], f"metadata:exam_type={typ}"
    for key in ("Medical Discipline", "Clinical Department"):
        value = str(md.get(key, ""))
        if value and _hint(value, CMEXAM_DISCIPLINE_HINTS):
            return _hint(value, CMEXAM_DISCIPLINE_HINTS), f"metadata:{key}={value}"
    if md.get("subject_name") in MEDMCQA_SUBJECT:
        return MEDMCQA_SUBJECT[md["subject_name"]], f"metadata:subject_name={md['subject_name']}"
    if md.get("subject") in SUBJECT:
        return SUBJECT[md["subject"]], f"metadata:subject={md['subject']}"
    return None


def operation_from_metadata(rec: QARecord) -> tuple[str, str] | None:
    value = str(rec.metadata.get("Competency Area", ""))
    if value and _hint(value, CMEXAM_COMPETENCY_HINTS):
        return _hint(value, CMEXAM_COMPETENCY_HINTS), f"metadata:Competency Area={value}"
    return None


# ----------------------------------------------------------------------------- keyword rules
# (tag, rule name, pattern). First match wins, so more specific rules come first.
# English patterns are case-insensitive and word-bounded where a substring would mislead.

def _rules(table: list[tuple[str, str, str]]) -> list[tuple[str, str, re.Pattern]]:
    return [(tag, name, re.compile(pat, re.I)) for tag, name, pat in table]


SPECIALTY_RULES = _rules([
    ("tcm", "tcm_terms", r"中医|中药|方剂|辨证|证型|证候|针灸|经络|穴位|腧穴|脏腑|阴阳|气血|寒热|脾虚|肾虚|肝郁|气虚|血瘀|"
                         r"湿热|君药|\w{1,3}汤|丸剂|舌苔|脉象|脉[浮沉弦滑细数]|traditional chinese medicine|acupunct"),
    ("nursing", "nursing_terms", r"护理|护士|护师|宣教|健康教育|\bnurs(e|es|ing)\b"),
    ("pharmacy", "pharmacy_terms", r"药师|药剂|制剂|药物相互作用|药代|药动学|生物利用度|半衰期|处方|配伍|辅料|片剂|注射剂|"
                                   r"pharmacokinetic|bioavailability|half-life|pharmacist|dosage form|drug interaction"),
    ("public_health", "public_health_terms", r"流行病|公共卫生|卫生统计|预防医学|疫苗|接种|筛查|发病率|患病率|死亡率|人群|"
                                             r"队列|病例对照|统计学|抽样|标准差|营养素|食品卫生|职业病|环境卫生|"
                                             r"epidemiolog|public health|incidence|prevalence|vaccin|screening|"
                                             r"cohort|case-control|odds ratio|relative risk|sensitivity|specificity|"
                                             r"confidence interval|sample size"),
    ("medical_technology", "medtech_terms", r"检验科|技师|标本|试剂|染色|培养基|仪器|影像学检查方法|放射防护|X线摄影|"
                                            r"超声探头|质控|specimen|staining|reagent|radiograph(y|ic) technique|assay"),
    ("clinical_medicine", "patient_vignette", r"患者|患儿|病人|男性?，?\d+岁|女性?，?\d+岁|\d+\s*岁|主诉|查体|就诊|"
                                              r"year-old|\bpatient\b|presents? (to|with)|physical examination|"
                                              r"emergency department|history of"),
    ("clinical_medicine", "dental_terms", r"牙|龋|牙周|口腔|义齿|正畸|tooth|teeth|dental|dentist|enamel|dentin|pulp|caries|"
                                          r"denture|orthodont|periodont|gingiv|occlus|mandib|maxill|endodont|\bcrown"),
    ("basic_biomedicine", "basic_science_terms", r"解剖|生理|生化|生物化学|病理|微生物|免疫|遗传|基因|细胞|蛋白|酶|受体|"
                                                 r"神经纤维|胚胎|组织学|分子|代谢|anatom|physiolog|biochem|enzyme|\bgene|"
                                                 r"\bcell|receptor|protein|embryo|histolog|molecul|metabol|microb|"
                                                 r"bacteri|virus|immun|nerve|artery|muscle|hormone|vitamin|"
                                                 r"chromosom|\bdna\b|\brna\b|glucose|lipid|plasma|secret|bone|"
                                                 r"激素|维生素|染色体|神经|动脉|肌|骨|血浆|分泌"),
    ("clinical_medicine", "clinical_terms", r"诊断|治疗|手术|症状|体征|临床|疾病|综合征|感染|骨折|肿瘤|癌|炎|妊娠|"
                                            r"diagnos|treatment|surgery|symptom|clinical|disease|syndrome|infection|"
                                            r"fracture|tumou?r|carcinoma|cancer|pregnan|lesion|management|\bpain\b|fever"),
])

OPERATION_RULES = _rules([
    ("nursing_action", "nursing_action", r"护理措施|护理诊断|护士应|护士首先|首要的护理|健康指导|宣教|"
                                         r"nurse should|nursing (intervention|action|priority)"),
    ("public_health", "population_health", r"预防|流行病|疫苗|接种|筛查|发病率|患病率|人群|传播途径|消毒|卫生|"
                                           r"prevent|epidemiolog|incidence|prevalence|vaccin|screening|outbreak|"
                                           r"public health"),
    ("medication", "drug_choice", r"首选药|药物|用药|剂量|服用|给药|不良反应|禁忌|药|"
                                  r"\bdrug|medication|\bdose|dosage|prescri|pharmacolog|adverse effect|side effect"),
    ("test_interpretation", "test_result", r"检查结果|化验|实验室检查|血常规|尿常规|心电图|X线|CT|MRI|B超|超声|活检|"
                                           r"提示|指标|最有价值的检查|首选检查|"
                                           r"laboratory|lab (studies|values)|serum|ECG|electrocardiogra|x-ray|"
                                           r"\bCT\b|MRI|biopsy|ultrasound|which (test|study)|next best (test|step in diagnosis)"),
    ("diagnosis", "diagnosis", r"诊断|最可能|考虑为|可能是|应考虑|most likely (diagnosis|cause)|diagnos"),
    ("treatment", "treatment", r"治疗|处理|手术|首选|疗法|措施|management|treat|therapy|surgery|next (best )?step"),
    ("mechanism", "mechanism", r"机制|机理|原因|作用|病因|发病|为什么|由于|导致|mechanism|pathophysiolog|caused by|"
                               r"due to|responsible for|\bwhy\b|pathogenesis|etiolog"),
    ("knowledge_recall", "recall", r"是指|属于|称为|定义|不包括|包括|正确的是|错误的是|不正确|不属于|的是$|为$|是$|"
                                   r"which of the following|is called|defined as|\btrue\b|\bfalse\b|except|"
                                   r"^(what|which|who)\b"),
])


_SENTENCE_END = re.compile(r"(?<=[。？！?!\n])|(?<=\.)\s+")


def ask_of(stem: str) -> str:
    """The sentence that asks the question: the last non-empty sentence of the stem.

    Vignettes list labs, drugs and findings; what is *asked* decides the operation.
    """
    parts = [p.strip() for p in _SENTENCE_END.split(stem.strip()) if p and p.strip()]
    return parts[-1] if parts else stem


def _first_rule(rules, text: str) -> tuple[str, str] | None:
    for tag, name, pat in rules:
        m = pat.search(text)
        if m:
            return tag, f"keyword:{name}:{m.group(0)}"
    return None


def item_text(record: QARecord) -> str:
    """What the text-only taggers read: the stem and the options (never the answer or metadata)."""
    return record.question + "\n" + "\n".join(record.options.values())


def _learned(tagger: "TextTagger | None", record: QARecord, axis: str) -> tuple[str, str] | None:
    prediction = tagger.predict(record, axis) if tagger is not None else None
    return (prediction.tag, prediction.why) if prediction is not None else None


def tag_record(record: QARecord, *, text_only: bool = False, tagger: "TextTagger | None" = None) -> Tags:
    """Specialty and operation tags of one item, with the reason each was chosen.

    Metadata first (skipped with ``text_only=True``), then the learned ``tagger`` on each
    axis it has a model for (its ``unknown`` below the threshold is final), then the
    keyword rules. Reads only ``record.question``, ``record.options`` and
    ``record.metadata`` -- never ``record.answer``.
    """
    text = item_text(record)
    stem = record.question
    spec = None if text_only else specialty_from_metadata(record)
    spec = spec or _learned(tagger, record, "specialty") or _first_rule(SPECIALTY_RULES, text) \
        or (UNKNOWN, "no rule matched")
    # Operations are asked by the stem; options often mention drugs or tests as distractors.
    op = None if text_only else operation_from_metadata(record)
    op = op or _learned(tagger, record, "operation") or _first_rule(OPERATION_RULES, ask_of(stem)) \
        or _first_rule(OPERATION_RULES, stem) or (UNKNOWN, "no rule matched")
    return Tags(spec[0], op[0], spec[1], op[1])
