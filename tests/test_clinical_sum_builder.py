"""The Clinical-Sum builder on a synthetic NOTEEVENTS-shaped file written here (MIMIC text
never enters the repository): deterministic, reads only its documented columns, bad files in
one line."""

from __future__ import annotations

import csv
import json

import pytest

from medpeft.cli import main
from medpeft.data import load_benchmark
from medpeft.data.mimic import build_clinical_sum
from medpeft.errors import DataError

HEADER = ["ROW_ID", "SUBJECT_ID", "HADM_ID", "CHARTDATE", "CHARTTIME", "STORETIME", "CATEGORY", "DESCRIPTION",
          "CGID", "ISERROR", "TEXT"]
SECRET = "SENTINEL-NOT-A-DOCUMENTED-COLUMN"


def radiology(i: int) -> str:
    return (f"EXAMINATION: CHEST (PA AND LAT)\nINDICATION: cough, case {i}.\nFINDINGS: Lungs are clear. "
            f"Heart size is normal in case {i}. No effusion.\nIMPRESSION: No acute cardiopulmonary process {i}.")


def discharge(i: int) -> str:
    return (f"Admission Date: day {i}\nChief Complaint: chest pain\nBrief Hospital Course: Patient {i} was admitted "
            f"for chest pain and ruled out for MI.\nDischarge Medications: aspirin\nDischarge Diagnosis: chest pain")


def write_notes(path, n_rad: int = 12, n_dis: int = 5):
    with open(path, "w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(HEADER)
        for i in range(n_rad):
            writer.writerow([100 + i, SECRET, SECRET, "", SECRET, "", "Radiology", SECRET, "", "", radiology(i)])
        writer.writerow([500, SECRET, SECRET, "", "", "", "Radiology", SECRET, "", "", "FINDINGS only, no impression"])
        writer.writerow([501, SECRET, SECRET, "", "", "", "Radiology", SECRET, "", "1", radiology(99)])  # an error
        for i in range(n_dis):
            writer.writerow([700 + i, SECRET, SECRET, "", "", "", "Discharge summary", SECRET, "", "", discharge(i)])
    return path


def test_radiology_pairs_are_deterministic_and_read_only_the_documented_columns(tmp_path):
    notes = write_notes(tmp_path / "NOTEEVENTS.csv")
    meta = build_clinical_sum(notes, tmp_path / "a.jsonl", n=5, seed=3)
    build_clinical_sum(notes, tmp_path / "b.jsonl", n=5, seed=3)
    build_clinical_sum(notes, tmp_path / "c.jsonl", n=5, seed=4)
    a = (tmp_path / "a.jsonl").read_text()
    assert a == (tmp_path / "b.jsonl").read_text() and a != (tmp_path / "c.jsonl").read_text()
    assert SECRET not in a and SECRET not in (tmp_path / "a.jsonl.meta.json").read_text()
    assert meta["eligible"] == 12 and meta["written"] == 5 and meta["seed"] == 3 and meta["rows_read"] == 19
    assert meta == json.loads((tmp_path / "a.jsonl.meta.json").read_text())
    records = load_benchmark("summary", tmp_path / "a.jsonl").records  # the generic loader reads it
    first = records[0]
    i = int(first.id.split("-")[-1]) - 100
    assert first.question == f"Lungs are clear. Heart size is normal in case {i}. No effusion."
    assert first.reference == f"No acute cardiopulmonary process {i}."
    assert first.metadata == {"note_type": "radiology", "section": "IMPRESSION"}


def test_discharge_pairs_summarise_into_the_chosen_section(tmp_path):
    notes = write_notes(tmp_path / "NOTEEVENTS.csv")
    meta = build_clinical_sum(notes, tmp_path / "d.jsonl", kind="discharge", n=10)
    assert meta["eligible"] == meta["written"] == 5
    row = json.loads((tmp_path / "d.jsonl").read_text().splitlines()[0])
    assert row["summary"] == "Patient 0 was admitted for chest pain and ruled out for MI."
    assert "Brief Hospital Course" not in row["text"] and "Chief Complaint: chest pain" in row["text"]
    assert "Discharge Medications: aspirin" in row["text"]


def test_bad_notes_files_are_one_line(tmp_path, capsys):
    bad = tmp_path / "notes.csv"
    bad.write_text("ROW_ID,CATEGORY,TEXT\n1,Radiology,x\n")
    with pytest.raises(DataError, match="line 1: field 'ISERROR': missing column"):
        build_clinical_sum(bad, tmp_path / "o.jsonl")
    notes = write_notes(tmp_path / "NOTEEVENTS.csv", n_rad=0, n_dis=0)
    code = main(["clinical-sum", str(notes), "--out", str(tmp_path / "o.jsonl")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "no Radiology notes with the sections" in err
    assert not (tmp_path / "o.jsonl").exists()
    assert main(["clinical-sum", str(write_notes(tmp_path / "N2.csv")), "--out", str(tmp_path / "ok.jsonl"),
                 "--n", "3"]) == 0
    assert "wrote 3 pairs (12 eligible of 19 notes, seed 0)" in capsys.readouterr().out
